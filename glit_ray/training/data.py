"""Datasets: train, held-out and test splits for the supernet, the search and retraining.

The held-out split is what the search scores candidates on. It is carved from the training data
with a fixed seed (SPOS: 50,000 ImageNet training images), so the test split is never seen during
search. Sources, named by a spec string:

- `digits`: the UCI handwritten digits as scikit-learn ships them (1,797 8x8 grayscale images,
  10 classes, pixel values 0-16), copied into the package as `digits.npz` (45 KB): real data that
  needs no download, read without importing scikit-learn, which costs every Ray worker that
  builds the splits 1.2 s of CPU. Its test split is a fixed 20 %.
- `cifar10:PATH`, `cifar100:PATH`: the python version of CIFAR in a local folder (checksums verified).
- `imagefolder:PATH`: ImageNet layout, PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg (val is the
  test split).

Every view is read as uint8 tensors, timm's prefetcher convention: a quarter of float32's size, and
the per-pixel work moves to the device, batched. Training images go through timm's transforms with
the run's recipe (`glit_ray.training.recipe`: crop scale, flips, colour jitter, RandAugment; bicubic) in the loader
processes; `DeviceAugment` normalises their batches and erases random boxes on the device, and `mixup_for`
gives the recipe's mixup/cutmix. Of the recipe, the digits (tensors in memory) take only what acts on a batch:
erasing and mixup/cutmix.
The held-out and test splits, and the training images BatchNorm is recalibrated on
(`Splits.calibration`), are read with the deterministic eval transform, normalised on the device
per batch (`normalize`). An image that cannot be decoded stops the run with one line naming its file.
"""
from __future__ import annotations

import copy
import functools
import os
import pickle
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import make_dataset

from glit_ray.core.errors import UserError
from glit_ray.training.recipe import PRESETS, Recipe

SPEC_FORMS = "digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH"
SPLIT_SEED = 0  # fixed: the held-out and test splits never change with the run's seed
SAMPLE_SEED = 1  # fixed: the calibration sample and held-out subsets are the same in every run
HELDOUT_FRACTION, HELDOUT_MAX = 0.2, 50_000


@dataclass
class Splits:
    train: Dataset        # augmented uint8 images (float for digits), finished on the device by `DeviceAugment`
    heldout: Dataset      # deterministic view: uint8 images (float for digits), see `normalize`
    test: Dataset         # likewise
    calibration: Dataset  # the training images through the deterministic view: what BatchNorm is recalibrated on
    num_classes: int
    natural_images: bool  # image files, decoded and augmented by the recipe's transform in the loader processes
    mean: tuple[float, ...] | None = None  # how `normalize` maps the uint8 views; None: they are floats already
    std: tuple[float, ...] | None = None


def parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return kind, None
    if kind in ("cifar10", "cifar100", "imagefolder") and path:
        return kind, Path(path).expanduser()
    raise UserError(f"unknown dataset {spec!r}: use {SPEC_FORMS}")


def located(spec: str) -> str:
    """`spec` checked, its path made absolute: Ray's workers and trials run in their own directories, where a path
    relative to the command's directory points nowhere."""
    kind, path = parse_spec(spec)
    return f"{kind}:{path.resolve()}" if path else kind


def build_splits(spec: str, img_size: int, in_chans: int, recipe: Recipe = PRESETS["deit"]) -> Splits:
    """The splits of dataset `spec`, at the image size and channels a space expects, training images augmented as
    `recipe` says."""
    kind, path = parse_spec(spec)
    if kind == "digits":
        return _digits(img_size, in_chans)
    make, eval_tf = _natural_images(kind, path, in_chans), eval_transform(img_size)
    train_view, test = make(True, train_transform(img_size, recipe)), make(False, eval_tf)
    eval_view = copy.copy(train_view)  # the same files (no second scan), read deterministically
    eval_view.transform = eval_tf
    if test.classes != train_view.classes:
        raise UserError(f"{path}: the test split's classes differ from the training split's; give both the same class folders")
    train_idx, heldout_idx = _carve(len(train_view))
    return Splits(Subset(train_view, train_idx), Subset(eval_view, heldout_idx), test, Subset(eval_view, train_idx),
                  len(train_view.classes), True, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def training_images(data: str, space) -> int:
    """How many images `data`'s training split holds at `space`'s size (what a recipe preset is chosen by, and the
    steps a supernet's default epochs count)."""
    return len(build_splits(data, space.img_size, space.in_chans).train)


def build_test(spec: str, img_size: int, in_chans: int) -> tuple[Dataset, tuple | None, tuple | None, int]:
    """Only the test split as (uint8 view, mean, std, classes): what evaluating a trained model reads, without
    scanning the training images (an ImageNet copy may hold only val/)."""
    kind, path = parse_spec(spec)
    if kind == "digits":
        splits = _digits(img_size, in_chans)
        return splits.test, None, None, splits.num_classes
    test = _natural_images(kind, path, in_chans)(False, eval_transform(img_size))
    return test, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, len(test.classes)


def _natural_images(kind: str, path: Path, in_chans: int):
    """The split maker of a CIFAR or ImageNet-layout copy, once it is known to be there and RGB fits the space."""
    if in_chans != 3:
        raise UserError(f"{kind} has RGB images but the search space takes in_chans {in_chans}; use a space with in_chans: 3")
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist: point {kind}:PATH at the local copy (no download is attempted)")
    return _imagefolder(path) if kind == "imagefolder" else _cifar(kind, path)


def eval_transform(img_size: int):
    """DeiT's evaluation view (resize, centre crop 0.875, bicubic) as uint8 tensors, timm's prefetcher convention."""
    return create_transform(img_size, is_training=False, interpolation="bicubic",
                            crop_pct=1.0 if img_size < 64 else 0.875, use_prefetcher=True)


def train_transform(img_size: int, recipe: Recipe = PRESETS["deit"]):
    """The recipe's training transform up to uint8 tensors (random erasing follows on the device: `DeviceAugment`),
    with RandAugment's posterize safe at every magnitude.

    `rand-m9-mstd0.5-inc1` draws magnitudes up to 10, where the increasing posterize keeps 0 bits:
    a black image in the TF and UDA references and in Pillow before 13, which now refuses it.
    """
    transform = create_transform(img_size, is_training=True, use_prefetcher=True, scale=recipe.scale,
                                 hflip=recipe.hflip, color_jitter=recipe.color_jitter, auto_augment=recipe.aa,
                                 interpolation="bicubic")
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits of each channel (0 bits: black), as TF's RandAugment does."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))


def load_rgb(path: str) -> Image.Image:
    """torchvision's image loader, with a file that cannot be decoded named in one line."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's words for unreadable and truncated files
        raise UserError(f"{path} is not a readable image ({str(exc).strip() or type(exc).__name__}); "
                        "replace or delete the file, then run again") from None


def _carve(n: int) -> tuple[list[int], list[int]]:
    """Split n training indices into (train, held-out) with the fixed split seed."""
    count = min(round(HELDOUT_FRACTION * n), HELDOUT_MAX)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits: (images, uint8 (1797, 8, 8) of 0-16; labels, uint8 (1797,)), in scikit-learn's order."""
    with np.load(files(__package__) / "digits.npz") as digits:
        return digits["images"], digits["labels"]


def _digits(img_size: int, in_chans: int) -> Splits:
    pixels, targets = load_digits()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    if img_size != images.shape[-1]:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, in_chans, -1, -1).contiguous()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(0.2 * len(labels))
    test_idx, rest = order[:n_test], order[n_test:]
    train_pos, heldout_pos = _carve(len(rest))
    train_idx, heldout_idx = rest[train_pos], rest[heldout_pos]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std

    def split(idx):
        return TensorDataset(images[idx], labels[idx])

    train = split(train_idx)
    return Splits(train, split(heldout_idx), split(test_idx), train, 10, False)


def _cifar(kind: str, path: Path):
    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    root = path.parent if path.name == cls.base_folder else path
    expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def make(train: bool, transform):
        try:
            return cls(str(root), train=train, transform=transform, download=False)
        except RuntimeError:  # torchvision's word for missing files or a checksum mismatch
            raise UserError(
                f"{root / cls.base_folder} is not a complete {kind} folder (needs {', '.join(expected)} with their "
                f"published checksums): extract the python version of {kind} there"
            ) from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{root / cls.base_folder}: a batch file is corrupt ({type(exc).__name__}); re-extract {kind}") from None

    return make


def _imagefolder(path: Path):
    def make(train: bool, transform):
        split = path / ("train" if train else "val")
        if not split.is_dir():
            raise UserError(f"{split} is missing: imagefolder:PATH needs PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg")
        try:
            return ListedImageFolder(str(split), transform=transform, loader=load_rgb)
        except (FileNotFoundError, OSError) as exc:
            raise UserError(f"{split}: {exc}; put images in one sub-folder per class") from None

    return make


class ListedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose file listing this process keeps while no class folder changes (its mtime): a
    command builds the splits to choose its recipe (`training_images`) and again to run, and listing
    ImageNet's 1.28 M files is the slow part of both."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        stamps = tuple(os.stat(os.path.join(directory, name)).st_mtime_ns for name in sorted(class_to_idx))
        return list(_listing(str(directory), tuple(sorted(class_to_idx.items())), extensions, is_valid_file,
                             allow_empty, stamps))


@functools.lru_cache(maxsize=4)
def _listing(directory: str, classes: tuple, extensions, is_valid_file, allow_empty: bool, stamps: tuple) -> tuple:
    """torchvision's listing of `directory`, cached by its classes and their folders' modification times."""
    return tuple(make_dataset(directory, dict(classes), extensions=extensions, is_valid_file=is_valid_file,
                              allow_empty=allow_empty))


def normalize(images: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    """A batch of a deterministic view as the network takes it: uint8 -> normalised float, where it is."""
    if mean is None:
        return images
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean) / std


class DeviceAugment:
    """The end of the training transform, on a batch where it is (the GPU): uint8 -> normalised float, then the
    recipe's random erasing, as timm's prefetcher does. Its draws come from the training process's random state, which
    every epoch reseeds, so a resumed epoch replays the uninterrupted one whatever the loader processes."""

    def __init__(self, splits: Splits, device: torch.device, recipe: Recipe = PRESETS["deit"]):
        self.mean, self.std = splits.mean, splits.std
        self.erase = (RandomErasing(recipe.reprob, mode=recipe.remode, device=device) if recipe.reprob > 0
                      else None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = normalize(images, self.mean, self.std)
        return self.erase(images) if self.erase else images


def labels_of(dataset: Dataset) -> list[int]:
    """Every label of `dataset` without decoding an image (ImageFolder, CIFAR, TensorDataset, Subsets of them)."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    return list(dataset.targets)


def random_sample(n: int, count: int, seed: int = SAMPLE_SEED) -> list[int]:
    """`count` of the positions 0..n-1 (all of them when count >= n) in an order drawn with `seed`: batches taken
    in that order mix the classes even when the files are sorted by class, as ImageFolder's are."""
    return random.Random(seed).sample(range(n), min(count, n))


def stratified_sample(labels: list[int], count: int, seed: int = SAMPLE_SEED) -> list[int]:
    """`count` positions of `labels` drawn with `seed` so that each class keeps its share (all when count >= n).

    Classes get floor(count x share) each, and the remainder goes to the classes with the largest
    fractional parts; within a class the positions are a seeded random draw.
    """
    if count >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    quota = {c: count * len(p) / len(labels) for c, p in by_class.items()}
    take = {c: int(q) for c, q in quota.items()}
    for c in sorted(quota, key=lambda c: (take[c] - quota[c], rng.random()))[:count - sum(take.values())]:
        take[c] += 1
    return sorted(p for c in sorted(by_class) for p in rng.sample(by_class[c], take[c]))


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader; training loaders shuffle with a seeded generator and drop the last batch."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def eval_batches(splits: Splits, dataset: Dataset, device: torch.device, batch_size: int = 256, workers: int = 0):
    """A deterministic view of `splits` streamed to `device` batch by batch and normalised there."""
    return view_batches(dataset, splits.mean, splits.std, device, batch_size, workers)


def view_batches(dataset: Dataset, mean: tuple | None, std: tuple | None, device: torch.device, batch_size: int = 256,
                 workers: int = 0):
    """A deterministic view streamed to `device` batch by batch and normalised there with `mean`/`std`."""
    for x, y in make_loader(dataset, batch_size, train=False, workers=workers):
        yield normalize(x.to(device, non_blocking=True), mean, std), y.to(device, non_blocking=True)


def mixup_for(splits: Splits, recipe: Recipe = PRESETS["deit"]) -> Mixup | None:
    """The recipe's mixup/cutmix (with its label smoothing on the mixed targets); None when it mixes nothing."""
    if not recipe.mixes:
        return None
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                 label_smoothing=recipe.smoothing, num_classes=splits.num_classes)
