"""P7: evaluator warm-up and memory per 1,000 held-out images: the first actor, a second on the node, a restarted one.

The search decodes its scoring sets once (`glit_ray.evaluator.scoring_sets`: Ray tasks decode the
calibration sample and the held-out images into uint8 chunks kept in the object store), then
starts its evaluator actors (`glit_ray.evaluator.Evaluator`, created with `evaluator_pool`'s
options), which load the supernet and map the sets from their node's object store. Timed, wall
clock in the driver:

- *first actor*: decoding the sets, then the first actor from its creation until it answers `stats`;
- *second actor*: another actor created on the node while the first lives, until it answers `stats`;
- *restarted actor*: an actor's process killed mid-call (`inject_exit`, then `score`), from the
  failed call's return until the restarted incarnation answers `stats` (`restarted` True, new pid).

Memory: the object store's bytes in use (the raylet's own count) after decoding and after every
actor and restart, and each actor process's RSS / USS / PSS at the start of its `__init__`, when
ready (sets mapped) and after scoring one candidate (every image read). The held-out images are
counted once per node when the store's bytes do not grow with actors and an actor's USS grows by
much less than the sets' bytes. The old way, where each actor decoded the held-out split itself
into float32, is given as a computed figure (4 bytes a pixel, private to each actor).

Target: second and restarted actor <= 0.10 of the first actor's time.

    python bench/evaluator_warmup.py [--data imagefolder:PATH] [--classes 20] [--train-per-class 250]
                                     [--calib-batches 4] [--restarts 3] [--record]

Without --data it writes a synthetic 256-px JPEG folder (glit_ray.synthetic; about 1 s per 100
images on 2 cores) whose held-out split (20 % of train) has classes x train-per-class / 5 images.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
import psutil  # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported)
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from glit_ray.data import build_splits
from glit_ray.evaluator import Evaluator, scoring_sets
from glit_ray.space import SearchSpace
from glit_ray.supernet import GLiTSupernet, save_supernet
from glit_ray.synthetic import write_imagefolder

from harness import publish, spread

MiB = 2**20


def memory(pid: int | None = None) -> dict:
    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss}


class MeasuredEvaluator(Evaluator):
    """The search's evaluator, with its process's memory taken at the start of `__init__` and when ready."""

    def __init__(self, *args, **kwargs):
        self.memory_start = memory()
        super().__init__(*args, **kwargs)
        self.memory_ready = memory()

    def memory(self) -> dict:
        return {"start": self.memory_start, "ready": self.memory_ready, "now": memory()}


def store_bytes() -> int:
    """Bytes in use in the object store (all nodes; here one), as the raylet counts them."""
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


def until_ready(actor) -> tuple[float, dict]:
    """Seconds until `actor` answers `stats` (retrying while it is restarting), and its answer."""
    started = time.perf_counter()
    while True:
        try:
            stats = ray.get(actor.stats.remote())
            return time.perf_counter() - started, stats
        except ray.exceptions.RayActorError:
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="imagefolder:PATH to reuse (default: write a synthetic folder)")
    parser.add_argument("--classes", type=int, default=20, help="of the synthetic folder")
    parser.add_argument("--train-per-class", type=int, default=250, help="of the synthetic folder (held-out: 20 %%)")
    parser.add_argument("--space", default="glit_pico")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 64 (the search's default "
                        "for imagefolder is 16)")
    parser.add_argument("--heldout-images", type=int, default=None, help="default: the whole held-out split")
    parser.add_argument("--restarts", type=int, default=3, help="actor restarts timed (alternating between the two actors)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    space = SearchSpace.load(args.space)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            started = time.perf_counter()
            write_imagefolder(Path(tmp) / "images", args.classes, args.train_per_class, 1, seed=0)
            data = f"imagefolder:{Path(tmp) / 'images'}"
            print(f"wrote {args.classes} x {args.train_per_class} training JPEGs in {time.perf_counter() - started:.0f} s",
                  flush=True)
        splits = build_splits(data, space.img_size, space.in_chans)
        torch.manual_seed(0)
        save_supernet(GLiTSupernet(space, "high", None, splits.num_classes), Path(tmp) / "supernet.pt")
        supernet_bytes = (Path(tmp) / "supernet.pt").read_bytes()
        ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)  # a cluster of its own
        try:
            body = measure(args, data, splits, supernet_bytes, space)
        finally:
            ray.shutdown()
    publish("P7", body, args.record)


def measure(args, data: str, splits, supernet_bytes: bytes, space: SearchSpace) -> str:
    empty_store = store_bytes()
    ref = ray.put(supernet_bytes)  # as evaluator_pool: the driver holds the supernet's bytes and the sets while actors live
    started = time.perf_counter()
    sets = scoring_sets(splits, args.calib_batches, args.heldout_images)
    decode_s = time.perf_counter() - started
    heldout, calib = len(sets["heldout"]), len(sets["calibration"])
    set_bytes = {name: s.nbytes for name, s in sets.items()}
    store = {"sets decoded (driver holds supernet bytes + sets)": store_bytes() - empty_store}
    print(f"decoded {calib} calibration + {heldout} held-out images in {decode_s:.2f} s", flush=True)

    remote = ray.remote(MeasuredEvaluator).options(num_cpus=0.9, num_gpus=0, max_restarts=-1, max_task_retries=0)
    actors, pids = [], {}
    wall = {}
    for i, name in enumerate(["first", "second"]):
        started = time.perf_counter()
        actors.append(remote.remote(ref, sets, i, 1, None))
        seconds, stats = until_ready(actors[-1])
        wall[name], pids[name] = seconds, stats["pid"]
        store[f"{name} actor ready"] = store_bytes() - empty_store
        print(f"{name} actor ready in {seconds:.2f} s (its __init__ {stats['ready_seconds']:.2f} s, pid {stats['pid']})",
              flush=True)
        if name == "first":
            first_init = stats["ready_seconds"]
        else:
            second_init = stats["ready_seconds"]
    stats_call = [timed_stats(actors[0]) for _ in range(5)]

    arch = str(space.sample("high", random.Random(0)))
    started = time.perf_counter()
    results = ray.get([a.score.remote(arch) for a in actors])  # every image read by both actors, side by side
    score_s = time.perf_counter() - started
    mem = {name: ray.get(a.memory.remote()) for name, a in zip(["first", "second"], actors)}
    store["both actors scored one candidate"] = store_bytes() - empty_store
    print(f"one candidate scored on both actors in {score_s:.1f} s (top-1 {results[0]['top1']:.2f} / {results[1]['top1']:.2f})",
          flush=True)

    restarts = []
    for r in range(args.restarts):
        actor = actors[r % 2]
        before = ray.get(actor.stats.remote())
        ray.get(actor.inject_exit.remote())
        died = time.perf_counter()
        try:
            ray.get(actor.score.remote(arch))
            raise SystemExit("error: the actor scored instead of exiting")
        except ray.exceptions.RayActorError:
            pass
        killed_s = time.perf_counter() - died
        seconds, stats = until_ready(actor)
        if not stats["restarted"] or stats["pid"] == before["pid"] or stats["loads"] != 1:
            raise SystemExit(f"error: actor {r % 2} did not come back as a restarted process: {stats}")
        restarts.append({"actor": r % 2, "seconds": seconds, "init": stats["ready_seconds"], "killed": killed_s,
                         "pid": stats["pid"], "old_pid": before["pid"]})
        store[f"restart {r + 1} ready"] = store_bytes() - empty_store
        print(f"restart {r + 1} (actor {r % 2}, pid {before['pid']} -> {stats['pid']}): ready {seconds:.2f} s after the "
              f"failed call returned ({killed_s:.2f} s to fail); its __init__ {stats['ready_seconds']:.2f} s", flush=True)
    ray.get(actors[0].score.remote(arch))  # the last restarted incarnation reads every image too
    mem["restarted"] = ray.get(actors[(args.restarts - 1) % 2].memory.remote()) if args.restarts else None
    store["after the restarts and a score"] = store_bytes() - empty_store
    for actor in actors:
        ray.kill(actor, no_restart=True)

    return report(args, data, decode_s, calib, heldout, set_bytes, wall, first_init, second_init, stats_call, restarts,
                  mem, store, score_s, len(supernet_bytes) / MiB)


def timed_stats(actor) -> float:
    started = time.perf_counter()
    ray.get(actor.stats.remote())
    return time.perf_counter() - started


def report(args, data, decode_s, calib, heldout, set_bytes, wall, first_init, second_init, stats_call, restarts, mem,
           store, score_s, supernet_mib) -> str:
    per = 1000 / heldout
    first = decode_s + wall["first"]
    restart = statistics.median(r["seconds"] for r in restarts)
    restart_init = statistics.median(r["init"] for r in restarts)
    sets_mib = sum(set_bytes.values()) / MiB
    heldout_mib = set_bytes["heldout"] / MiB

    def times(label, seconds, init, note):
        return f"| {label} | {seconds:.2f} | {seconds * per:.2f} | {init:.2f} | {seconds / first:.3f} | {note} |"

    rows = [
        times("first actor: decode the sets + start", first, first_init,
              f"decode {decode_s:.2f} s ({calib} calibration + {heldout} held-out images, Ray tasks on 2 CPUs) "
              f"+ actor {wall['first']:.2f} s"),
        times("second actor on the node", wall["second"], second_init, "created while the first lives"),
        times(f"restarted actor (median of {len(restarts)})", restart, restart_init,
              f"from the failed call's return; {spread([r['seconds'] for r in restarts])} s min / median / max"),
    ]

    def mem_row(label, m):
        if m is None:
            return ""
        s, r, n = m["start"], m["ready"], m["now"]
        return (f"| {label} | {s['rss'] / MiB:.0f} / {s['uss'] / MiB:.0f} | {r['rss'] / MiB:.0f} / {r['uss'] / MiB:.0f} | "
                f"{n['rss'] / MiB:.0f} / {n['uss'] / MiB:.0f} / {n['pss'] / MiB:.0f} | "
                f"{(n['uss'] - s['uss']) / MiB:.0f} | {(n['rss'] - s['rss']) / MiB:.0f} |")

    store_rows = [f"| {what} | {value / MiB:.1f} |" for what, value in store.items()]
    uss_growth = max((m["now"]["uss"] - m["start"]["uss"]) for m in mem.values() if m) / MiB
    ratio_second, ratio_restart = wall["second"] / first, restart / first
    return "\n".join([
        f"{args.space} (untrained supernet) on {data.split(':')[0]} ({heldout} held-out images of "
        f"{heldout_mib:.1f} MiB uint8 at 224 px, {calib} calibration images, {sets_mib:.1f} MiB in all); one Ray node, "
        f"2 CPUs, actors of 0.9 CPU and 1 torch thread as `evaluator_pool` makes them. Wall seconds in the driver, "
        f"until the actor answers `stats` (a warm `stats` call takes {statistics.median(stats_call) * 1e3:.0f} ms: "
        "it asks Ray's state API for the restart count); *__init__* is the actor's own `ready_seconds` (supernet "
        "loaded, sets mapped).", "",
        "| actor | seconds | seconds per 1,000 held-out | its __init__ s | / first | |",
        "| --- | ---: | ---: | ---: | ---: | --- |", *rows, "",
        "Memory of each actor process, MiB: RSS / USS at the start of its `__init__`, when ready, and RSS / USS / PSS "
        f"after scoring one candidate (every image read: {score_s:.1f} s for both actors side by side).", "",
        "| actor | start RSS / USS | ready RSS / USS | after scoring RSS / USS / PSS | USS growth | RSS growth |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[row for row in (mem_row("first", mem["first"]), mem_row("second", mem["second"]),
                          mem_row("last restarted", mem["restarted"])) if row], "",
        "Object store bytes in use over the empty store's, MiB (the raylet's count; the supernet's "
        f"{supernet_mib:.1f} MiB are in it too):", "",
        "| when | MiB |", "| --- | ---: |", *store_rows, "",
        f"The old way, each actor decoding the held-out split itself into float32: {4 * heldout_mib:.1f} MiB private to "
        f"each actor ({4 * heldout_mib * per:.1f} MiB per 1,000 held-out images), {8 * heldout_mib:.1f} MiB for two, "
        f"and each restart decoding again; now {heldout_mib:.1f} MiB ({heldout_mib * per:.1f} MiB per 1,000) once in "
        f"the node's object store, and an actor's USS grows by at most {uss_growth:.0f} MiB.", "",
        f"**second / first {ratio_second:.3f}, restarted / first {ratio_restart:.3f}** (target <= 0.10)",
    ])


if __name__ == "__main__":
    main()
