"""Ray for a command, and a training run on Ray Train: started, resumed from the checkpoints in its storage, or found
finished (its last epoch checkpointed) and not run again.
"""
from __future__ import annotations

import functools
import logging
import os
import zipfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from glit_ray.cluster.failure_policy import MAX_FAILURES
from glit_ray.cluster.ray_workarounds import restarts_for_failures_only, torch_config, train_result
from glit_ray.cluster.resources import Request, waiting_note
from glit_ray.core.cli import callers_signal_handlers
from glit_ray.core.errors import UserError, one_line
from glit_ray.training.loop import STATE_FILE, TrainJob, corrupt

def final_state(result: ray.train.Result) -> dict:
    """A finished run's last checkpoint: `model` (the weights) and `metrics` (rank 0's last epoch)."""
    with result.checkpoint.as_directory() as folder:
        try:
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise corrupt(result.checkpoint, exc) from None


def previous_run(storage: str) -> ray.train.Result | None:
    """The Ray Train run under STORAGE/train that an interrupted run left, with its latest checkpoint checked (whether
    its state file is a whole torch archive: its zip directory is read, not the tensors, from any storage); None when
    there is none yet. A corrupt one is refused here, before any worker starts."""
    try:
        result = train_result(f"{storage.rstrip('/')}/train")
    except RuntimeError:  # no run, or no checkpoint snapshot yet
        return None
    if result.checkpoint:
        try:
            with result.checkpoint.filesystem.open_input_file(f"{result.checkpoint.path}/{STATE_FILE}") as f:
                zipfile.ZipFile(f)
        except Exception as exc:
            raise corrupt(result.checkpoint, exc) from None
    return result


def finished_run(storage: str, epochs: int) -> ray.train.Result | None:
    """The Ray Train run under STORAGE/train when its last epoch (of `epochs`) is checkpointed: one stopped before
    its caller took the result, whose workers would train and report nothing."""
    previous = previous_run(storage)
    return previous if previous and previous.checkpoint and previous.metrics.get("epoch") == epochs - 1 else None


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray the process already has, else start one (or join `address`, else RAY_ADDRESS) with Ray's own
    log lines from ERROR up on the console (a command shows only ours of the workers' output: `ray_workarounds`)."""
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level=logging.ERROR)
        except ConnectionError as exc:  # no cluster there, or one that wants its token
            where = address or os.environ.get("RAY_ADDRESS", "auto")
            if isinstance(exc.__cause__, ray.exceptions.AuthenticationError):
                raise UserError(f"the Ray cluster at {where} wants its authentication token: set RAY_AUTH_MODE=token, "
                                "with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH") from None
            raise UserError(f"no Ray cluster to join at {where} ({str(exc).splitlines()[0]}); give --address of a "
                            "running one, or leave it and RAY_ADDRESS out to start one here") from None


def fit(train_loop, job: TrainJob, request: Request, storage: str | None = None,
        callbacks: list | None = None, say=None) -> ray.train.Result:
    """Run `train_loop({"job": job})` on the Ray Train workers of `request` with checkpoints under STORAGE/train
    (resumed if there).

    `storage` defaults to the run directory `job.out`; on a cluster whose workers do not share it, give a
    storage URI (s3://bucket/prefix) every node can reach.

    A UserError a worker raised (a corrupt checkpoint, an unreadable image) reaches the caller as itself, one line.
    A lost worker or node restarts every worker from the last checkpoint, `MAX_FAILURES` times at most
    (`failure_policy`).
    `callbacks`: Ray Train callbacks (a Tune trial passes `TuneReportCallback`, which hands each report to Tune).
    `say`: where to note that the workers wait for the autoscaler (`resources.waiting_note`), the driver's console.
    `job.workers.loader_workers` None becomes `default_loader_workers` of the CPUs each worker asks for.
    A run to resume whose latest checkpoint is corrupt is refused before any worker starts; one whose last epoch is
    checkpointed already (stopped before its caller exported the result) returns at once, unless `callbacks` wait
    for its reports (a Tune trial takes it from `finished_run` itself).
    """
    storage = storage or job.out
    job = replace(job, storage=None if storage == job.out else storage)
    finished = finished_run(storage, job.settings.epochs)
    if finished and not callbacks:
        return finished  # its last epoch is checkpointed: workers would train nothing
    ensure_ray()
    job = job.fed(request.cpus)
    # the job goes with the train function, an object Ray Train's controller passes on unopened, not as its
    # train_loop_config, which the controller unpickles: it would import glit_ray there, 3 s before any worker starts
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(train_loop, {"job": job}),
        torch_config=torch_config(request.gpus),
        scaling_config=ray.train.ScalingConfig(num_workers=request.count, use_gpu=request.gpus > 0,
                                               resources_per_worker=request.resources),
        run_config=ray.train.RunConfig(name="train", storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        with callers_signal_handlers(), restarts_for_failures_only(), \
                waiting_note(request, say) if say else nullcontext():
            return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        for failure in getattr(exc, "worker_failures", {}).values():
            if isinstance(failure, UserError):
                raise UserError(one_line(failure)) from None
        raise
