"""A supernet's Ray Train worker (SPOS): the paths of each step and the probes scored every few epochs.

Each step trains, with `sampling="fair"` (FairNAS, the default), as many paths as a block has choices, every choice
of every block in exactly one of them, their gradients summed into one update; or one path drawn uniformly (SPOS,
inside the run's limits).
The paths are a pure function of the seed and the global step, so every data-parallel worker runs the same path
without talking to the others (DDP would otherwise average gradients of different subnets), and a resumed run
replays the same paths. Rank 0 scores fixed probe paths on held-out images, which the verdict reads
(`glit_ray.training.verdict`). The command is `glit_ray.train_supernet`.
"""
from __future__ import annotations

import math
import random

import torch

from glit_ray.cluster import ray_workarounds
from glit_ray.models.arch import Architecture
from glit_ray.models.constraints import Limits, sample_within
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet
from glit_ray.training.data import build_splits
from glit_ray.training.imagesets import place, score_on, scoring_sets
from glit_ray.training.loop import TrainJob, made_ready, rank_and_world, train_epochs, worker_device
from glit_ray.training.settings import SupernetRun

CALIB_BATCHES = 4
PROBE_IMAGES = 2048
PROBE_SHARE = 0.1  # of the training compute, at most, that the probes take (`probe_every`)
SAMPLING = ("uniform", "fair")


class PathSampler:
    """The paths of each training step, keyed by step: one uniform over the level (inside the limits), or `fair`:
    one per choice of the blocks, each block's choices shuffled across them (FairNAS's strict fairness; a block with
    fewer choices than another fills its extra paths with random ones of its own)."""

    def __init__(self, space: SearchSpace, level: str, distribution, limits: Limits, num_classes: int, seed: int,
                 sampling: str = "uniform"):
        self.space, self.level, self.distribution = space, level, distribution
        self.limits, self.num_classes, self.seed, self.sampling = limits, num_classes, seed, sampling

    def __call__(self, step: int) -> tuple[Architecture, ...]:
        rng = random.Random(f"{self.seed}:{step}")
        if self.sampling == "uniform":
            return (sample_within(self.space, self.level, rng, self.limits, self.num_classes, self.distribution),)
        choices = self.space.block_choices(self.level, self.distribution)
        paths = max(map(len, choices))
        columns = [rng.sample(c, len(c)) + rng.choices(c, k=paths - len(c)) for c in choices]
        return tuple(Architecture(blocks) for blocks in zip(*columns))

    def probes(self) -> dict[str, Architecture]:
        """Fixed paths scored every epoch: the smallest and largest (when inside the limits), three random."""
        choices = self.space.block_choices(self.level, self.distribution)
        cost = lambda b: self.limits.cost(self.space, Architecture((b,)), self.num_classes).flops  # noqa: E731
        extremes = {
            "smallest": Architecture(tuple(min(c, key=cost) for c in choices)),
            "largest": Architecture(tuple(max(c, key=cost) for c in choices)),
        }
        probes = {k: a for k, a in extremes.items() if self.limits.admits(self.limits.cost(self.space, a, self.num_classes))}
        rng = random.Random(f"{self.seed}:probes")
        for i in range(3):
            probes[f"random{i}"] = sample_within(self.space, self.level, rng, self.limits, self.num_classes, self.distribution)
        return probes


def train_loop(config: dict) -> None:
    """One Ray Train worker of `config["job"]` (a `TrainJob` of a `SupernetRun`)."""
    ray_workarounds.quiet_train_worker_log()
    job: TrainJob = config["job"]
    device = worker_device(job)
    settings: SupernetRun = job.settings
    splits = build_splits(settings.data, settings.space.img_size, settings.space.in_chans, settings.recipe)
    sampler = PathSampler(settings.space, settings.level, settings.distribution, settings.limits, splits.num_classes,
                          settings.seed, settings.sampling)

    torch.manual_seed(settings.seed)
    net = GLiTSupernet(settings.space, settings.level, settings.distribution, splits.num_classes,
                       drop_path_rate=settings.recipe.drop_path)
    loader, recipe, start_epoch, model = made_ready(net, job, splits, device, find_unused_parameters=True)
    probes = probe_sets = None
    if rank_and_world(job)[0] == 0:
        probes = sampler.probes()
        probe_sets = place(scoring_sets(splits, CALIB_BATCHES, PROBE_IMAGES, cluster=False,
                                        workers=job.workers.loader_workers), device)
        every = probe_every(len(probes) * sum(map(len, probe_sets.values())),
                            len(loader) * settings.batch_size * settings.paths)

    def score_probes(epoch: int) -> tuple[dict, str]:
        if (epoch + 1) % every and epoch != settings.epochs - 1:
            return {}, f"probes every {every} epochs"
        top1 = {f"probe_{name}_top1": score_on(net, arch, probe_sets, device)["top1"] for name, arch in probes.items()}
        return top1, f"probe top-1 {min(top1.values()):.1f}-{max(top1.values()):.1f}%"

    train_epochs(job, net, model, recipe, loader, start_epoch, device, score_probes, path_at=sampler)


def probe_every(probe_images: int, epoch_images: int) -> int:
    """Epochs between probe rounds (the last epoch always has one): every epoch unless scoring the probes (one
    forward pass over `probe_images`, calibration and held-out images of every probe) costs more than PROBE_SHARE of
    an epoch's training on the worker (`epoch_images`, each path's images of a step, a forward and a backward pass:
    about three forward passes)."""
    return max(1, math.ceil(probe_images / (PROBE_SHARE * 3 * epoch_images)))
