"""Architectures trained on their own as Ray Tune trials: what the shortlist and the audit both run.

Each trial trains one architecture with one seed, with retraining's code and recipe
(`glit_ray.training.retrain_loop.train_loop`: in the trial's own process on one worker, which asks for the
worker's CPUs and GPU and checkpoints through Tune, under RUN_DIR/WHAT/tune or --storage; on several,
on its own Ray Train workers, a GPU each on a GPU cluster), resuming its own checkpoints, and hands
Tune the held-out top-1 of every epoch; the test split is never scored. The trials run side by
side as far as the cluster holds them, and the console gets one line per finished trial. Killed, the same command resumes: Tune restores its trials
(`Tuner.restore`) and each resumes from its last epoch's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from glit_ray.cluster.failure_policy import MAX_FAILURES
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.ray_workarounds import trial_checkpoints_persisted
from glit_ray.cluster.resources import Request, capacity, check_together, cluster_shape, plan, waiting_note
from glit_ray.cluster.storage import check_reachable
from glit_ray.core.cli import callers_signal_handlers
from glit_ray.core.errors import UserError, one_line
from glit_ray.core.progress import console
from glit_ray.training.fit import finished_run, fit
from glit_ray.training.flags import check_ingest
from glit_ray.training.loop import STATE_FILE, TrainJob
from glit_ray.training.retrain_loop import train_loop as retrain_loop
from glit_ray.training.settings import RetrainRun, Training

METRIC = "heldout_top1"
BAD_INPUT = "bad_input"  # a trial's last report when bad input ended it: the error's one line


@dataclass(frozen=True)
class Standalone:
    """One trial: `arch` trained from scratch with `seed`, in the directory `name` of the command's folder;
    `about`: what its console line says it is."""
    name: str
    arch: str
    seed: int
    about: str = ""


def standalone_trial(config: dict) -> None:
    """One Tune trial: train `config["trials"][config["index"]]` for the settings' epochs, resuming its own
    checkpoints. On one worker it trains in this process, reporting and checkpointing through Tune (a trial's Ray
    Train processes took 16 s to start, importing torch and timm again, for a few seconds of a short trial's
    training); on several, on its own Ray Train workers, each epoch's metrics reaching Tune through
    `TuneReportCallback`. A failure (its process or node lost) restarts it from its last checkpoint, `MAX_FAILURES`
    times at most; bad input ends it with the error as its last report."""
    try:
        _train_trial(config)
    except UserError as exc:  # bad input fails the same way again: the trial ends with it, not retried by Tune
        tune.report({BAD_INPUT: one_line(exc), METRIC: float("nan")})  # Tune wants its metric in every report


def _train_trial(config: dict) -> None:
    trial: Standalone = config["trials"][config["index"]]
    settings, where, folder = config["settings"], config["where"], config["folder"]
    trained = RetrainRun(**{f.name: getattr(settings, f.name) for f in fields(Training)} | {"seed": trial.seed},
                         arch=trial.arch, from_supernet=None)
    job = TrainJob.placed(trained, where.out / folder / trial.name, f"{folder} {trial.name}", progress=False,
                          where=where, score_test=False, epoch_lines=config["epoch_lines"])
    storage = f"{where.storage.rstrip('/')}/{folder}/{trial.name}" if where.storage else None
    if settings.workers == 1:
        finished = tune.get_checkpoint() is None and last_epoch_persisted(settings.epochs)
        if finished:  # killed after its last checkpoint, before Tune recorded it: Tune gets its last report from there
            tune.report(finished)
            return
        retrain_loop({"job": replace(job, in_trial=True, storage=storage).fed(config["request"].cpus)})
        return
    finished = finished_run(storage or job.out, settings.epochs)
    if finished:  # killed after its last checkpoint: Tune gets its last report from there
        tune.report(finished.metrics)
        return
    fit(retrain_loop, job, replace(config["request"], count=settings.workers), storage,
        callbacks=[TuneReportCallback()])


def last_epoch_persisted(epochs: int) -> dict | None:
    """The metrics of this one-worker trial's last epoch (of `epochs`) when its checkpoint is on the storage though
    Tune restored the trial without one; None otherwise (a checkpoint half written counts as none)."""
    persisted = trial_checkpoints_persisted()
    if not persisted:
        return None
    try:
        with persisted[-1].as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state["metrics"] if state["epoch"] == epochs - 1 else None


def side_by_side(what: str, settings: Training, trials: int, where: Placement) -> tuple[int, Request]:
    """How many trials run at once (as many as the cluster can hold; with Ray Data ingest, one trial fewer, whose
    CPUs decode), and the request of their workers together."""
    shape = cluster_shape()
    check_reachable(where.storage or where.out / what, "--storage", shape)
    every = plan(what, trials * settings.workers, where.workers.gpus, where.workers.cpus, shape=shape,
                 together=False)
    check_together(replace(every, count=settings.workers), shape)  # a trial's workers start together
    held = capacity(every, shape) // settings.workers - (where.workers.ingest == "ray-data")
    at_once = min(trials, max(1, held))
    request = replace(every, count=at_once * settings.workers)
    check_ingest(where.workers.ingest, request, shape)
    return at_once, request


class FinishedLine(tune.Callback):
    """One console line per finished trial: what it trained and its held-out top-1. (Tune keeps it in its
    experiment state, and a restored run gets it back: it holds nothing but the trials.)"""

    def __init__(self, trials: list[Standalone]):
        self.trials = trials

    def on_trial_complete(self, iteration, trials, trial, **info):
        ours, last = self.trials[trial.config["index"]], trial.last_result or {}
        score = (f"held-out top-1 {last[METRIC]:.2f}% after {last['epoch'] + 1} epoch(s)" if "epoch" in last
                 else f"stopped: {last[BAD_INPUT]}" if BAD_INPUT in last else "no score")
        finished = sum(t is trial or t.status == "TERMINATED" for t in trials)
        console().print(f"[{finished}/{len(self.trials)}] {ours.name} {ours.about} {ours.arch}: {score}")


def train_standalone(what: str, settings: Training, trials: list[Standalone], where: Placement,
                     placed: tuple[int, Request], resumed: bool, say, starting: str, scheduler=None,
                     epoch_lines: bool = True) -> list[dict]:
    """Train (or resume) every trial under RUN_DIR/`what`/ (`where.out` is RUN_DIR), `placed` as `side_by_side`
    said; return each one's last metrics, in the trials' order. `starting`: the console's line for a run that is
    not resumed; `epoch_lines`: a console line per trial's epoch too, not only per finished trial."""
    folder, (at_once, request) = Path(where.out) / what, placed
    # one worker: the trial trains in its own process and asks for the worker's CPUs and GPUs; several: it only
    # waits on its Ray Train workers, which hold them, and asks for no CPU (and a token of memory, as Tune wants a
    # non-empty request), so that the workers of every trial fit
    trainable = tune.with_resources(standalone_trial, {"cpu": request.cpus, "gpu": request.gpus}
                                    if settings.workers == 1 else {"cpu": 0, "memory": 2**20})
    # where Tune keeps its state, and the checkpoints of the trials that train in their own process: --storage
    # (every node reaches it), else the run directory
    storage = f"{where.storage.rstrip('/')}/{what}" if where.storage else str(folder)
    param_space = {"index": tune.grid_search(list(range(len(trials)))), "trials": trials, "settings": settings,
                   "where": where, "request": request, "folder": what, "epoch_lines": epoch_lines}
    if resumed and tune.Tuner.can_restore(f"{storage}/tune"):
        say(f"resuming the {what} of {where.out}")
        # the same param space again: a trial that had not started is rebuilt from it (Tune's own record of it
        # keeps dataclasses as tuples)
        tuner = tune.Tuner.restore(f"{storage}/tune", trainable, param_space=param_space, resume_unfinished=True,
                                   resume_errored=True)
    else:
        say(f"{starting}, {at_once} at a time")
        tuner = tune.Tuner(trainable, param_space=param_space,
                           # a finished trial's process runs the next: its imports are done (the start of a Ray
                           # process that imports torch is most of a short trial's time)
                           tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                                       max_concurrent_trials=at_once, reuse_actors=True),
                           run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                                     failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                                                     callbacks=[FinishedLine(trials)]))
    say(str(request))
    with callers_signal_handlers(), waiting_note(request, say):
        results = tuner.fit()
    metrics: list[dict | None] = [None] * len(trials)
    for result in results:
        index = result.config["index"]
        if BAD_INPUT in (result.metrics or {}):
            raise UserError(result.metrics[BAD_INPUT])
        if result.error is not None or METRIC not in (result.metrics or {}):
            raise UserError(f"{what} trial {trials[index].name} ({trials[index].arch}) failed ({result.error}); "
                            f"see {storage}/tune, then run the command again to resume")
        metrics[index] = result.metrics
    return metrics
