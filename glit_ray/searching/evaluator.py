"""Evaluator actors: each holds one supernet replica and scores candidates on its device.

An actor loads the supernet once, from a reference to its file's bytes in the object store (the
driver reads the file once; actors on any node get the bytes through Ray), and maps the search's
calibration sample and held-out images, decoded once per search (`glit_ray.training.imagesets`), from its
node's object store. Scoring a candidate is then pure compute: BatchNorm recalibration on the
calibration sample, one pass over the held-out images (under bfloat16 autocast on a GPU). With
`latency`, each candidate's latency on the actor's device is measured first (cached per
architecture) and one over the limit is recorded as rejected, unscored.
"""
from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import ray
import torch

from glit_ray.cluster.ray_workarounds import actor_restarted, quiet_actor_creation
from glit_ray.cluster.resources import CPU_ACTOR_SHARE, Request, placed_device
from glit_ray.models.arch import Architecture
from glit_ray.models.cost import arch_cost
from glit_ray.models.latency import device_name, measure_ms
from glit_ray.models.supernet import load_supernet
from glit_ray.searching.settings import Latency
from glit_ray.training.data import Splits
from glit_ray.training.imagesets import ImageSet, place, score_on, scoring_sets

class Evaluator:
    """Scores candidates of one supernet. Used as a Ray actor (`ray.remote(Evaluator)`)."""

    def __init__(self, supernet_bytes: bytes, sets: dict[str, ImageSet], actor_id: int, threads: int = 1,
                 latency: Latency | None = None, flops_convention: str = "macs"):
        """`sets`: the "calibration" and "heldout" ImageSets (`scoring_sets`); `latency`: what to measure (None:
        none); `flops_convention`: of the rows' flops."""
        started = time.perf_counter()
        torch.set_num_threads(threads)
        self.actor_id, self.node = actor_id, ray.get_runtime_context().get_node_id()
        self.device = placed_device("evaluator")
        self.net, _ = load_supernet(io.BytesIO(supernet_bytes), map_location=self.device)
        self.loads = 1
        self.device_name = device_name(self.device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self.latency, self.latency_ms = latency, {}  # arch string -> milliseconds
        self.flops_convention = flops_convention
        self.sets = place({name: image_set.fetched() for name, image_set in sets.items()}, self.device)
        self.ready_seconds = time.perf_counter() - started

    def score(self, arch_text: str) -> dict:
        """Recalibrate BatchNorm for `arch`, then top-1/top-5/loss on the held-out split."""
        started = time.perf_counter()
        arch = Architecture.parse(arch_text)
        cost = arch_cost(self.net.space, arch, self.net.num_classes, self.flops_convention)
        row = {"flops": cost.flops, "flops_convention": self.flops_convention, "params": cost.params,
               "actor": self.actor_id, "node": self.node,
               "device": self.device_name}
        with self.autocast:
            if self.latency:
                row.update(latency_ms=(latency := self.measure(arch)), latency_source="measured")
                limit = self.latency.max_ms
                if limit is not None and latency > limit:
                    return {**row, "status": "rejected", "eval_seconds": time.perf_counter() - started,
                            "error": f"latency {latency:.3g} ms is over --latency-max-ms {limit:g}"}
            metrics = score_on(self.net, arch, self.sets, self.device)
        return {**metrics, **row, "eval_seconds": time.perf_counter() - started}

    def measure(self, arch: Architecture) -> float:
        """Milliseconds per forward pass of `arch` at the stated batch size (median after warm-up), cached."""
        key = str(arch)
        if key not in self.latency_ms:
            space = self.net.space
            example = torch.randn(self.latency.batch, space.in_chans, space.img_size, space.img_size, device=self.device)
            self.net.eval()
            self.latency_ms[key] = measure_ms(lambda x: self.net(x, arch), example)
        return self.latency_ms[key]

    def stats(self) -> dict:
        """How often this actor process loaded the supernet (once), how long it took to be ready, where it runs,
        the bytes of images it holds on its device (0 on a CPU: they are the node's shared copy) and the
        device's peak memory so far."""
        on_device = sum(s.nbytes for s in self.sets.values() if s.chunks and s.chunks[0][0].is_cuda)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {"actor": self.actor_id, "loads": self.loads, "pid": os.getpid(), "node": self.node,
                "device": str(self.device), "restarted": actor_restarted(), "ready_seconds": self.ready_seconds,
                "device_image_bytes": on_device, "device_peak_bytes": peak}


@contextmanager
def evaluator_pool(supernet_bytes: bytes, splits: Splits, calib_batches: int, heldout_images: int | None,
                   request: Request, latency: Latency | None = None, flops_convention: str = "macs",
                   actor_class: type = Evaluator) -> Iterator[list]:
    """Start the evaluators of `request` (`resources.evaluators`) for the `with` block: `actor_class` actors (an
    `Evaluator`, or a subclass of one).

    The scoring sets are decoded first, once (`scoring_sets`), and every actor maps them from its
    node's object store. A CPU actor runs as many torch threads as its CPU share rounds to. Actors
    are spread over the nodes, restart without limit when their process or node dies, and never
    re-run a call themselves: the `Dispatcher` re-queues the candidate of a call cut short. The
    supernet's bytes and the sets stay in the object store while the block runs, so that a
    restarted actor reloads them without decoding. On exit the actors are killed: their CPUs and
    GPUs go back to the cluster.
    """
    sets = scoring_sets(splits, calib_batches, heldout_images)  # this frame holds them, and the supernet's bytes,
    ref = ray.put(supernet_bytes)                               # while the block runs: restarts reload from them
    remote = ray.remote(actor_class).options(num_cpus=request.cpus, num_gpus=request.gpus, max_restarts=-1,
                                           max_task_retries=0, scheduling_strategy="SPREAD")
    threads = 1 if request.gpus else max(1, round(request.cpus / CPU_ACTOR_SHARE))
    with quiet_actor_creation():
        pool = [remote.remote(ref, sets, i, threads, latency, flops_convention) for i in range(request.count)]
    try:
        yield pool
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
