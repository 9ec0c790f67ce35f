"""What a training worker reads: its shard of the training set, reshuffled per epoch, each sample augmented from
its own seed, so that a resumed run replays an uninterrupted one whatever the number of loader processes.
"""
from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from glit_ray.training.data import Splits
from glit_ray.training.flags import check_epoch_has_a_step

def default_loader_workers(data: str, cpus: float) -> int:
    """DataLoader processes per Ray Train worker: one per CPU it holds on image data (decoding and augmenting
    224-px JPEGs is the input pipeline's cost; BENCHMARKS.md, P6), none for the in-memory digits."""
    return 0 if data == "digits" else max(1, int(cpus))


class EpochSampler(Sampler):
    """This worker's shard of the training set for the epoch `set_epoch` names, as (epoch, index) pairs."""

    def __init__(self, shard: DistributedSampler):
        self.shard, self.epoch = shard, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shard.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.shard)

    def __len__(self) -> int:
        return len(self.shard)


class SeededSamples(Dataset):
    """A training set whose augmentation of each sample is a function of (seed, epoch, index).

    Loader processes persist across epochs (timm's and DeiT's habit), so their random state would
    carry over from the epoch they started in, and a resumed run would augment differently. Seeding
    per sample makes the augmentation the same with any number of loader processes, resumed or not.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # in a loader process the random state is the sample's alone; in the training process (no loader
        # processes) it is put back, so that the draws of the step's drop-path and mixup stay as they were
        with nullcontext() if get_worker_info() else preserved_random_state():
            seed_all(((self.seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63, gpus=False)
            return self.dataset[index]


def shard_of(splits: Splits, seed: int, world: int, rank: int) -> DistributedSampler:
    """Worker `rank`'s share of the training set, reshuffled per epoch (`set_epoch`), whole batches only."""
    return DistributedSampler(splits.train, world, rank, shuffle=True, seed=seed, drop_last=True)


def training_loader(splits: Splits, batch_size: int, seed: int, loader_workers: int, device: torch.device,
                    world: int = 1, rank: int = 0, **loader_options) -> DataLoader:
    """Shard `rank` of `world` of the training set, reshuffled per epoch by `loader.sampler.set_epoch`.

    Loader processes persist across epochs and pin their batches for a GPU; image augmentation is
    seeded per sample (`SeededSamples`), so that a resumed run replays an uninterrupted one.
    `loader_options` go to the DataLoader (the input-pipeline benchmark tries others).
    """
    check_epoch_has_a_step(len(splits.train), batch_size, world)
    shard = shard_of(splits, seed, world, rank)
    dataset, sampler = splits.train, shard
    if splits.natural_images:
        dataset, sampler = SeededSamples(splits.train, seed), EpochSampler(shard)
    options = {"persistent_workers": loader_workers > 0, "pin_memory": device.type == "cuda", **loader_options}
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, num_workers=loader_workers, **options)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed dropout, drop-path and mixup per epoch, so a resumed epoch replays an uninterrupted one."""
    seed_all(seed * 100_003 + epoch * 101 + rank)


def seed_all(value: int, gpus: bool = True) -> None:
    """Seed the random state timm's layers and augmentations draw from: torch's (its GPUs' too, with `gpus`),
    `random`'s and NumPy's."""
    if gpus:
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


@contextmanager
def preserved_random_state():
    """Put this process's CPU random state (torch's, `random`'s, NumPy's) back when the block ends. About
    0.1 ms, most of it NumPy's: a sample loaded in a loader process does without."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
