"""Evaluator actors: each holds one supernet replica and scores candidates on its device.

An actor loads the supernet once, from a reference to its file's bytes in the object store (the
driver reads the file once; actors on any node get the bytes through Ray), and keeps its
calibration and held-out batches on its device. Scoring a candidate is then pure compute:
BatchNorm recalibration on K training batches, one pass over the held-out images (under bfloat16
autocast on a GPU). With `latency`, each candidate's latency on the actor's device is measured
first (cached per architecture) and one over the limit is recorded as rejected, unscored.
"""
from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import ray
import torch

from .arch import Architecture
from .cost import arch_cost
from .data import build_splits, first_batches
from .latency import device_name, measure_ms
from .scoring import score
from .supernet import load_supernet

CALIB_BATCH_SIZE = 64
EVAL_BATCH_SIZE = 256


class Evaluator:
    """Scores candidates of one supernet. Used as a Ray actor (`ray.remote(Evaluator)`)."""

    def __init__(self, supernet_bytes: bytes, data: str, calib_batches: int, heldout_images: int | None, actor_id: int,
                 threads: int = 1, latency: dict | None = None):
        """`latency`: {"batch": images per timed pass, "max_ms": limit or None}; None measures none."""
        torch.set_num_threads(threads)
        self.actor_id, self.node = actor_id, ray.get_runtime_context().get_node_id()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net, _ = load_supernet(io.BytesIO(supernet_bytes), map_location=self.device)
        self.loads = 1
        self.device_name = device_name(self.device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.latency, self.latency_ms = latency, {}  # arch string -> milliseconds
        space = self.net.space
        splits = build_splits(data, space.img_size, space.in_chans)
        heldout = splits.heldout
        if heldout_images is not None and heldout_images < len(heldout):
            heldout = torch.utils.data.Subset(heldout, range(heldout_images))
        self.calib = calibration_batches(splits.train, calib_batches, self.device)
        self.heldout = first_batches(heldout, EVAL_BATCH_SIZE, None, self.device)
        self.fail_next = 0  # test hooks: make the next N calls raise, or make the next call kill the process
        self.exit_next = False

    def score(self, arch_text: str) -> dict:
        """Recalibrate BatchNorm for `arch`, then top-1/top-5/loss on the held-out split."""
        if self.exit_next:
            os._exit(1)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError(f"injected failure on actor {self.actor_id}")
        started = time.perf_counter()
        arch = Architecture.parse(arch_text)
        cost = arch_cost(self.net.space, arch, self.net.num_classes)
        row = {"flops": cost.flops, "params": cost.params, "actor": self.actor_id, "node": self.node,
               "device": self.device_name}
        with self.autocast:
            if self.latency:
                row["latency_ms"] = latency = self.measure(arch)
                limit = self.latency["max_ms"]
                if limit is not None and latency > limit:
                    return {**row, "status": "rejected", "eval_seconds": time.perf_counter() - started,
                            "error": f"latency {latency:.3g} ms is over --latency-max-ms {limit:g}"}
            metrics = score(self.net, arch, self.calib, self.heldout)
        return {**metrics, **row, "eval_seconds": time.perf_counter() - started}

    def measure(self, arch: Architecture) -> float:
        """Milliseconds per forward pass of `arch` at the stated batch size (median after warm-up), cached."""
        key = str(arch)
        if key not in self.latency_ms:
            space = self.net.space
            example = torch.randn(self.latency["batch"], space.in_chans, space.img_size, space.img_size, device=self.device)
            self.net.eval()
            self.latency_ms[key] = measure_ms(lambda x: self.net(x, arch), example)
        return self.latency_ms[key]

    def stats(self) -> dict:
        """How often this actor process loaded the supernet (once), whether Ray restarted it, and where it runs."""
        return {"actor": self.actor_id, "loads": self.loads, "pid": os.getpid(), "node": self.node,
                "device": str(self.device), "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    def inject_failures(self, count: int) -> None:
        self.fail_next = count

    def inject_exit(self) -> None:
        """The next `score` call kills this actor's process mid-candidate, as a crash or a lost node would."""
        self.exit_next = True


def calibration_batches(train, count: int, device) -> list[torch.Tensor]:
    """The images of the first `count` training batches of CALIB_BATCH_SIZE: what BatchNorm is recalibrated on."""
    return [x for x, _ in first_batches(train, CALIB_BATCH_SIZE, count, device)]


@contextmanager
def evaluator_pool(supernet_bytes: bytes, data: str, calib_batches: int, heldout_images: int | None,
                   actors: int, gpus_per_actor: float | None, latency: dict | None = None) -> Iterator[list]:
    """Start `actors` evaluators for the `with` block: one GPU each when the cluster has GPUs, else a CPU share.

    CPU actors share 90 % of the cluster's CPUs (the rest is for the Tune trial that feeds them) and
    run as many torch threads as their share rounds to. Actors are spread over the nodes, restart
    without limit when their process or node dies, and never re-run a call themselves: the
    `Dispatcher` re-queues the candidate of a call cut short. The supernet's bytes go to the
    object store once and stay there while the block runs, so that a restarted actor can reload
    them. On exit the actors are killed: their CPUs and GPUs go back to the cluster.
    """
    cluster = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    share = cluster.get("CPU", 1) / actors
    cpus = 1.0 if gpus_per_actor else 0.9 * share
    ref = ray.put(supernet_bytes)  # this frame holds it while the block runs: restarts reload from it
    remote = ray.remote(Evaluator).options(num_cpus=cpus, num_gpus=gpus_per_actor, max_restarts=-1, max_task_retries=0,
                                           scheduling_strategy="SPREAD")
    threads = max(1, round(share)) if not gpus_per_actor else 1
    pool = [remote.remote(ref, data, calib_batches, heldout_images, i, threads, latency) for i in range(actors)]
    try:
        yield pool
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
