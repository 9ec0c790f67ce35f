"""Fan candidates out to evaluator actors, keep each busy, and route around actors that die.

Two kinds of failure are told apart. A candidate whose scoring raises (a bad path, an injected
error) is the candidate's fault: it is tried once more, then recorded as failed. An actor that
dies (its process exits, its node is removed) is not: its in-flight candidates go back to the
queue for the other actors, and the actor is left out until Ray has restarted it and it answers
a ping, in this generation or a later one. Each candidate therefore gets exactly one result.

An actor gets work only after answering a ping (sent at the start of every `score` call to the
actors not already waited for): a call to an actor Ray is still restarting, or cannot place
because its node is gone, would otherwise wait for it, and the generation with it.
"""
from __future__ import annotations

import time
from collections import deque

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from glit_ray.core.errors import UserError, one_line

IN_FLIGHT_PER_ACTOR = 2  # one call computing, one queued behind it, so an actor never waits on the driver
CANDIDATE_ATTEMPTS = 2  # a candidate whose scoring errors is tried once more, then recorded as failed
ACTOR_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


class Dispatcher:
    """Scores lists of candidates on a fixed set of evaluator actors; lives as long as they do."""

    def __init__(self, actors: list):
        self.actors = list(actors)
        self.down: dict = {}  # ping ref -> actor not yet known to be alive; it gets work when the ping answers
        self.lost_calls = 0   # calls that an actor's death cut short (their candidates were re-queued)

    def score(self, archs: list[str], progress=None) -> list[dict]:
        """Score `archs`; results come back in `archs` order, one per candidate."""
        results: list[dict | None] = [None] * len(archs)
        attempts = [0] * len(archs)
        queue = deque(range(len(archs)))
        in_flight: dict = {}
        waited_for = list(self.down.values())
        for actor in (a for a in self.actors if a not in waited_for):
            self.ping(actor)
        slots: list = []
        while queue or in_flight:
            while queue and slots:
                i, actor = queue.popleft(), slots.pop()
                in_flight[actor.score.remote(archs[i])] = (i, actor)
            if not in_flight and not self.down:
                raise RuntimeError("every evaluator actor is dead and out of restarts")
            (ref,), _ = ray.wait([*in_flight, *self.down], num_returns=1)
            if ref in self.down:
                actor = self.down.pop(ref)
                try:
                    ray.get(ref)
                except ACTOR_LOST as exc:
                    if "UserError: " in str(exc):  # its constructor refused (a GPU it cannot see): every one will
                        raise UserError(one_line(exc)) from None
                    self.actors.remove(actor)  # out of restarts: gone for good
                    continue
                slots.extend([actor] * IN_FLIGHT_PER_ACTOR)
                continue
            i, actor = in_flight.pop(ref)
            try:
                results[i] = {"status": "ok", "error": None, **ray.get(ref)}  # or the evaluator's own "rejected"
            except ACTOR_LOST:
                self.lost_calls += 1
                queue.appendleft(i)
                slots = [a for a in slots if a != actor]
                if actor not in self.down.values():
                    self.ping(actor)
                continue
            except Exception as exc:  # the candidate's scoring failed: retry once, then record it
                slots.append(actor)
                attempts[i] += 1
                if attempts[i] < CANDIDATE_ATTEMPTS:
                    queue.append(i)
                    continue
                results[i] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"[:500]}
            else:
                slots.append(actor)
            results[i]["timestamp"] = time.time()
            if progress:
                progress.update(1)
        return results

    def ping(self, actor) -> None:
        """Wait (in `score`'s loop) for `actor` to answer; it answers once alive, after any restart."""
        self.down[actor.stats.options(max_task_retries=-1).remote()] = actor
