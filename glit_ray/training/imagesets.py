"""Fixed image sets decoded once: the held-out images candidates are scored on and the calibration sample, and
scoring a network on them (`score_on`: what the search's actors, supernet training's probes and retraining share).

Every candidate of a search is scored on the same images: a seeded random sample of training images
that BatchNorm is recalibrated on (SPOS recalibrates on random training batches; a class-sorted
folder's first batches would show a handful of classes) and the held-out split or a seeded,
class-stratified subset of it. Decoding 224-px JPEGs is the slow part, so a search decodes each set
once, in Ray tasks spread over the cluster's CPUs, into uint8 chunks at the space's image size
(150 KB an image, a quarter of float32) that stay in Ray's object store. Every evaluator actor on a
node maps the node's one copy (numpy arrays come out of the object store without a copy), and a
restarted actor maps it again instead of decoding. Batches are normalised on the actor's device.

On a GPU, sets are copied to the device once while together they fit in a quarter of its memory
(calibration first); a set that does not fit stays in host memory and streams to the device batch
by batch through pinned memory.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from glit_ray.core.errors import UserError
from glit_ray.core.progress import bar, driver_has_terminal
from glit_ray.models.arch import Architecture
from glit_ray.models.scoring import score
from glit_ray.training.data import Splits, labels_of, normalize, parse_spec, random_sample, stratified_sample

CHUNK = 512  # images per decoded chunk: a multiple of the batch sizes read from it (64, 256)
DEVICE_SHARE = 0.25  # of a GPU's memory, for the sets it keeps resident

CALIB_BATCH_SIZE = 64
EVAL_BATCH_SIZE = 256
# (calibration batches, held-out images; None: all) per kind of data set when the search is not told:
# chosen from bench/ranking_stability.py (BENCHMARKS.md, P8: how closely smaller sets rank candidates as a
# large calibration and the whole held-out split do), with room for ImageNet's 1,000 classes.
SCORING_DEFAULTS = {"digits": (4, None), "cifar10": (16, 10_000), "cifar100": (16, 10_000), "imagefolder": (16, 10_000)}


def scoring_sizes(data: str, calib_batches: int | None = None, heldout_images: int | None = None) -> tuple[int, int | None]:
    """The calibration batches and held-out images a search on `data` scores with: as given, else its defaults."""
    default_calib, default_heldout = SCORING_DEFAULTS[parse_spec(data)[0]]
    return calib_batches or default_calib, heldout_images or default_heldout


@dataclass
class ImageSet:
    """Images with labels in chunks (torch tensors, or object-store references until `fetched`)."""

    chunks: list  # [(images N x C x H x W uint8 or float, labels N int64)] or their ObjectRefs
    mean: tuple[float, ...] | None  # `data.normalize`'s arguments for the images
    std: tuple[float, ...] | None
    count: int  # images
    nbytes: int  # of the images and labels

    def __len__(self) -> int:
        return self.count

    def fetched(self) -> ImageSet:
        """This set with its chunks out of the object store: zero-copy views of the node's shared copy."""
        if not self.chunks or not isinstance(self.chunks[0], ray.ObjectRef):
            return self
        with warnings.catch_warnings():  # object-store arrays are read-only, and nothing writes to them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return replace(self, chunks=[(torch.from_numpy(x), torch.from_numpy(y)) for x, y in ray.get(self.chunks)])

    def to(self, device: torch.device) -> ImageSet:
        return replace(self, chunks=[(x.to(device), y.to(device)) for x, y in self.chunks])

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised (images, labels) batches on `device`, in order; a batch never spans two chunks."""
        for images, labels in self.fetched().chunks:
            for start in range(0, len(labels), batch_size):
                x, y = images[start:start + batch_size], labels[start:start + batch_size]
                if device.type == "cuda" and not x.is_cuda:  # a host chunk streams through pinned memory
                    x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                else:  # already there (a CPU, or a set resident on the GPU): no copy
                    x, y = x.to(device), y.to(device)
                yield normalize(x, self.mean, self.std), y


def calibration_indices(splits: Splits, images: int) -> list[int]:
    """The calibration sample: `images` training images drawn at random with a fixed seed."""
    return random_sample(len(splits.calibration), images)


def heldout_indices(splits: Splits, images: int | None) -> list[int]:
    """The held-out images scored: all, or a fixed class-stratified subset of `images`."""
    labels = labels_of(splits.heldout)
    return list(range(len(labels))) if images is None else stratified_sample(labels, images)


def compact(dataset: Dataset, indices: list[int]) -> Dataset:
    """A dataset of just `indices` of `dataset`, small to pickle (file names or pixels of those items only)."""
    if isinstance(dataset, Subset):
        return compact(dataset.dataset, [dataset.indices[i] for i in indices])
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    small = copy.copy(dataset)
    small.targets = [dataset.targets[i] for i in indices]
    if hasattr(dataset, "samples"):  # ImageFolder
        small.samples = small.imgs = [dataset.samples[i] for i in indices]
    else:  # CIFAR: pixels in memory
        small.data = dataset.data[indices]
    return small


def decode(splits: Splits, dataset: Dataset, indices: list[int], workers: int = 0) -> ImageSet:
    """Decode `indices` of `dataset` (a deterministic view of `splits`) in this process, with `workers` loader processes."""
    loader = DataLoader(compact(dataset, indices), batch_size=CHUNK, num_workers=workers)
    chunks = [(x, y.long()) for x, y in loader]
    return ImageSet(chunks, splits.mean, splits.std, len(indices), sum(x.nbytes + y.nbytes for x, y in chunks))


def decode_on_cluster(splits: Splits, dataset: Dataset, indices: list[int], what: str = "images") -> ImageSet:
    """Decode `indices` of `dataset` in Ray tasks spread over the nodes, a chunk each; the set holds the chunks'
    references, which keep them in the object store while the caller holds the set.

    Waits until every chunk is decoded; an unreadable image is raised here as its one-line UserError.
    A TensorDataset (the digits) holds its images decoded already: its chunks are cut here and put in the store,
    which spares a Ray task process importing torch for nothing.
    """
    if isinstance(dataset, TensorDataset):
        local = decode(splits, dataset, indices)
        return replace(local, chunks=[ray.put((x.numpy(), y.numpy())) for x, y in local.chunks])
    items = ray.put(compact(dataset, indices))
    tasks = [_decode_chunk.remote(items, start, min(start + CHUNK, len(indices)))
             for start in range(0, len(indices), CHUNK)]
    chunks, sizes = [chunk for chunk, _ in tasks], [size for _, size in tasks]
    progress = bar(len(indices), f"decoding {what}", driver_has_terminal())
    pending, nbytes = list(sizes), 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            count, chunk_bytes = ray.get(done[0])
            progress.update(count)
            nbytes += chunk_bytes
    except ray.exceptions.RayTaskError as exc:
        _retrieve_all(chunks + sizes)  # every failed chunk's error is seen: Ray reports none as unhandled
        if isinstance(exc.cause, UserError):
            raise exc.cause from None
        raise
    finally:
        progress.close()
    return ImageSet(chunks, splits.mean, splits.std, len(indices), nbytes)


def _retrieve_all(refs: list) -> None:
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    for ref in refs:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError:
            pass


@ray.remote(num_cpus=1, num_returns=2, scheduling_strategy="SPREAD")
def _decode_chunk(items: Dataset, start: int, stop: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, int]]:
    """One chunk as (uint8 images, labels), and its (images, bytes): the small value the driver waits on."""
    torch.set_num_threads(1)
    pairs = [items[i] for i in range(start, stop)]
    images, labels = torch.stack([x for x, _ in pairs]).numpy(), np.array([int(y) for _, y in pairs], dtype=np.int64)
    return (images, labels), (len(pairs), images.nbytes + labels.nbytes)


def place(sets: dict[str, ImageSet], device: torch.device) -> dict[str, ImageSet]:
    """`sets` for scoring on `device`: on a GPU, copied there in order while they fit in DEVICE_SHARE of its
    memory (the rest stream per batch from pinned host memory); on a CPU, as they are."""
    if device.type != "cuda":
        return sets
    budget = DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
    placed = {}
    for name, image_set in sets.items():
        if image_set.nbytes <= budget:
            budget -= image_set.nbytes
            image_set = image_set.to(device)
        placed[name] = image_set
    return placed


def scoring_sets(splits: Splits, calib_batches: int, heldout_images: int | None, cluster: bool = True,
                 workers: int = 0) -> dict[str, ImageSet]:
    """The calibration sample (`calib_batches` x CALIB_BATCH_SIZE training images drawn at random) and the held-out
    images (all, or a class-stratified `heldout_images`) a search scores on, decoded once: over the cluster in
    Ray tasks, or with `cluster=False` in this process with `workers` loader processes."""
    indices = {"calibration": calibration_indices(splits, calib_batches * CALIB_BATCH_SIZE),
               "heldout": heldout_indices(splits, heldout_images)}
    views = {"calibration": splits.calibration, "heldout": splits.heldout}
    if cluster:
        return {name: decode_on_cluster(splits, views[name], indices[name], f"the {name} images") for name in views}
    return {name: decode(splits, views[name], indices[name], workers) for name in views}


def score_on(net: torch.nn.Module, arch: Architecture | None, sets: dict[str, ImageSet], device: torch.device) -> dict:
    """Score `arch` of `net` (None: `net` itself) as the search does: recalibrate on the calibration set, then
    top-1/top-5/loss on the held-out set."""
    calib = (x for x, _ in sets["calibration"].batches(CALIB_BATCH_SIZE, device))
    return score(net, arch, calib, sets["heldout"].batches(EVAL_BATCH_SIZE, device))
