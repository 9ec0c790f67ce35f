"""The training recipe as settings: DeiT's parts, named as timm's `train.py` names them, and two presets.

DeiT's recipe (RandAugment m9, mixup 0.8, cutmix 1.0, random erasing 0.25, label smoothing, 5 warm-up epochs,
AdamW 5e-4 x batch / 512) is tuned for ImageNet's 1.28 M images; on a few thousand small images it regularises so
hard that a short run stays at chance (`../shared/reference/supernet-trust.md`). So a run's recipe starts from a
preset chosen by the training split's size and image size (`choose_preset`), `deit` for ImageNet-scale data and
`small-data` otherwise, and every part can be set on the command line with timm's flag (`add_recipe_arguments`).

The learning-rate rule is timm's (`train.py --lr-base --lr-base-size --lr-base-scale`): without `--lr`, the peak
learning rate is lr_base x (global batch / lr_base_size), or its square root with `sqrt`. Every command applies it
through `Recipe.learning_rate` to the global batch (per-worker batch x workers) and prints it (`Recipe.describe`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace

from timm.optim import list_optimizers

from glit_ray.core.errors import UserError

PRESET_NAMES = ("deit", "small-data")
# below either, DeiT's regularisation keeps a short run at chance: ImageNet-scale data is large in count and in pixels
DEIT_MIN_IMAGES, DEIT_MIN_SIZE = 100_000, 112
SCHEDULES = ("cosine", "tanh", "poly")  # timm's schedules that need no further setting (step needs decay epochs)
ERASE_MODES = ("const", "rand", "pixel")
FUSED = ("adam", "adamw")  # timm's names whose torch optimizer has a fused kernel (one for every parameter's update)


@dataclass(frozen=True)
class Recipe:
    """How a run trains: optimiser and schedule, augmentation, regularisation (timm's `train.py` names)."""
    preset: str  # the preset the defaults came from (`PRESETS`)
    opt: str = "adamw"
    lr: float | None = None  # None: lr_base scaled to the global batch (`learning_rate`)
    lr_base: float = 5e-4
    lr_base_size: int = 512
    lr_base_scale: str = "linear"  # or "sqrt"
    weight_decay: float = 0.05
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment (timm's string); None: none
    color_jitter: float = 0.4  # timm leaves it out when `aa` is set
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    hflip: float = 0.5
    reprob: float = 0.25  # random erasing, on the device
    remode: str = "pixel"
    mixup: float = 0.8  # mixup's alpha (0: off)
    cutmix: float = 1.0  # cutmix's alpha (0: off)
    mixup_prob: float = 1.0
    smoothing: float = 0.1
    drop_path: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(self.scale))  # (frozen) JSON gives a list
        if self.preset not in PRESET_NAMES:
            raise UserError(f"--recipe {self.preset!r} is not a preset; give one of {', '.join(PRESET_NAMES)}")
        if self.opt not in list_optimizers():
            raise UserError(f"--opt {self.opt!r} is not one of timm's optimizers; give e.g. adamw, sgd, lamb, lion")
        for name in ("hflip", "reprob", "mixup_prob", "drop_path"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{flag(name)} {getattr(self, name):g} is not a probability; give a value in 0..1")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"--smoothing {self.smoothing:g} must be in 0..1 (0: plain cross-entropy)")
        for name in ("mixup", "cutmix", "weight_decay", "color_jitter", "warmup_lr", "min_lr", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} {getattr(self, name):g} is negative; give 0 or more (0: off)")
        for name in ("lr", "lr_base"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{flag(name)} {value:g} is not a learning rate; give a value above 0")
        if self.lr_base_size < 1:
            raise UserError(f"--lr-base-size {self.lr_base_size} must be a batch size of at least 1")
        if self.lr_base_scale not in ("linear", "sqrt"):
            raise UserError(f"--lr-base-scale {self.lr_base_scale!r}: give linear or sqrt")
        if self.sched not in SCHEDULES:
            raise UserError(f"--sched {self.sched!r} is not supported; give one of {', '.join(SCHEDULES)}")
        if self.remode not in ERASE_MODES:
            raise UserError(f"--remode {self.remode!r}: give one of {', '.join(ERASE_MODES)}")
        if not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1):
            raise UserError(f"--scale {' '.join(map(str, self.scale))}: give two area fractions MIN MAX with "
                            "0 < MIN <= MAX <= 1")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix): images are paired, so a batch must be even."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def learning_rate(self, global_batch: int) -> float:
        """The peak learning rate: `lr` when given, else lr_base scaled from lr_base_size to `global_batch`."""
        if self.lr is not None:
            return self.lr
        ratio = global_batch / self.lr_base_size
        return self.lr_base * (math.sqrt(ratio) if self.lr_base_scale == "sqrt" else ratio)

    def describe(self, batch_size: int, workers: int) -> str:
        """The learning rate and where it came from, as a command's header prints it."""
        batch = batch_size * workers
        came = f"global batch {batch} = {batch_size} x {workers} worker{'s' * (workers > 1)}"
        if self.lr is not None:
            return f"lr {self.lr:.3g} (--lr; {came})"
        ratio = f"{batch}/{self.lr_base_size}"
        rule = f"sqrt({ratio})" if self.lr_base_scale == "sqrt" else ratio
        return f"lr {self.learning_rate(batch):.3g} = {self.lr_base:g} x {rule} ({came})"

    def check_batch(self, batch_size: int, flag: str = "--batch-size") -> None:
        """Mixup and cutmix pair each image with another of its batch (timm's Mixup), so the batch must be even."""
        if self.mixes and batch_size % 2:
            raise UserError(f"{flag} {batch_size} is odd, and mixup/cutmix (--mixup {self.mixup:g}, --cutmix "
                            f"{self.cutmix:g}) pair the images of a batch; give an even {flag}, or --mixup 0 --cutmix 0")

    def differences(self, other: Recipe, prefix: str = "") -> list[str]:
        """The flags on which `other` differs from this recipe, as `--flag old -> new`."""
        return [f"--{prefix}{flag(f.name)} {show(getattr(self, f.name))} -> {show(getattr(other, f.name))}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


PRESETS = {
    # DeiT's ImageNet recipe (Touvron et al. 2021, as GLiT retrained; `../shared/reference/glit.md`)
    "deit": Recipe("deit"),
    # what learns in a few epochs on a few thousand small images (BENCHMARKS.md, P13r): AdamW with a cosine schedule
    # and one warm-up epoch, label smoothing, random crops of 80-100 % of the area with flips, nothing that mixes or
    # erases; the learning rate scaled by the square root of the batch, timm's rule for adaptive optimisers
    "small-data": Recipe("small-data", lr_base=3e-3, lr_base_size=32, lr_base_scale="sqrt", warmup_epochs=1,
                         warmup_lr=1e-5, aa=None, color_jitter=0.0, scale=(0.8, 1.0), reprob=0.0, mixup=0.0,
                         cutmix=0.0),
}


def choose_preset(train_images: int, img_size: int) -> str:
    """`deit` for ImageNet-scale data (at least DEIT_MIN_IMAGES training images of at least DEIT_MIN_SIZE px),
    else `small-data`."""
    return "deit" if train_images >= DEIT_MIN_IMAGES and img_size >= DEIT_MIN_SIZE else "small-data"


def flag(name: str) -> str:
    return name.replace("_", "-")


def show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


OPTIONS = {  # flag help; argparse types come from the fields
    "opt": "optimizer, by timm's name (create_optimizer_v2)",
    "lr": "peak learning rate; default: --lr-base scaled to the global batch",
    "lr_base": "learning rate at a global batch of --lr-base-size",
    "lr_base_size": "the global batch --lr-base is for",
    "lr_base_scale": "linear or sqrt: how the learning rate follows the global batch",
    "weight_decay": "decoupled weight decay",
    "sched": f"learning-rate schedule, stepped per update ({', '.join(SCHEDULES)})",
    "warmup_epochs": "epochs of linear warm-up from --warmup-lr",
    "warmup_lr": "learning rate the warm-up starts at",
    "min_lr": "learning rate the schedule ends at",
    "aa": "RandAugment policy (timm's string, e.g. rand-m9-mstd0.5-inc1); none: off",
    "color_jitter": "colour jitter strength (timm leaves it out under --aa)",
    "scale": "random-resized-crop area range, MIN MAX",
    "hflip": "horizontal flip probability",
    "reprob": "random erasing probability",
    "remode": "random erasing mode (const, rand, pixel)",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "mixup_prob": "probability that a batch is mixed",
    "smoothing": "label smoothing",
    "drop_path": "stochastic depth rate",
}


def add_recipe_arguments(parser: argparse.ArgumentParser, prefix: str = "", **command_defaults) -> None:
    """`--recipe` and one flag per part of the recipe (timm's names, with `prefix`: the search's supernet takes
    `--supernet-opt` and so on); each defaults to the preset's value (`command_defaults`: this command's own)."""
    group = parser.add_argument_group(f"{prefix.replace('-', ' ')}training recipe",
                                      "each defaults to the chosen preset's value (README: Training recipes)")
    group.add_argument(f"--{prefix}recipe", choices=PRESET_NAMES, default=None,
                       help="preset the recipe starts from (default: deit for at least "
                            f"{DEIT_MIN_IMAGES:,} training images of at least {DEIT_MIN_SIZE} px, else small-data)")
    for f in fields(Recipe):
        if f.name == "preset":
            continue
        deit, small = getattr(PRESETS["deit"], f.name), getattr(PRESETS["small-data"], f.name)
        default = command_defaults.get(f.name)
        presets = f"{show(default)} here" if default is not None else f"deit {show(deit)}, small-data {show(small)}"
        if f.name == "lr":
            presets = "the rule"
        kind = {"aa": str, "scale": float, "opt": str, "sched": str, "remode": str, "lr_base_scale": str,
                "lr_base_size": int, "warmup_epochs": int}.get(f.name, float)
        group.add_argument(f"--{prefix}{flag(f.name)}", dest=f"{prefix.replace('-', '_')}{f.name}", type=kind,
                           default=None, nargs=2 if f.name == "scale" else None,
                           metavar=("MIN", "MAX") if f.name == "scale" else None,
                           help=f"{OPTIONS[f.name]} (default: {presets})")


def recipe_from_args(args: argparse.Namespace, train_images: int, img_size: int, prefix: str = "",
                     **command_defaults) -> Recipe:
    """The recipe the command line gives: the preset it names, else the one the data calls for (`choose_preset`),
    with this command's defaults and then each flag given put over it."""
    dest = prefix.replace("-", "_")
    preset = getattr(args, f"{dest}recipe") or choose_preset(train_images, img_size)
    given = {f.name: getattr(args, f"{dest}{f.name}") for f in fields(Recipe)
             if f.name != "preset" and getattr(args, f"{dest}{f.name}", None) is not None}
    if given.get("aa", "").lower() == "none":
        given["aa"] = None
    return replace(PRESETS[preset], **{**command_defaults, **given})


def header(recipe: Recipe, train_images: int, img_size: int, batch_size: int, workers: int) -> str:
    """A command's recipe line: the preset and why, the flags set over it, and the learning rate with its batch."""
    why = "chosen for" if recipe.preset == choose_preset(train_images, img_size) else "--recipe, on"
    changed = [f"--{flag(f.name)} {show(getattr(recipe, f.name))}" for f in fields(Recipe)
               if getattr(recipe, f.name) != getattr(PRESETS[recipe.preset], f.name)]
    return (f"recipe: {recipe.preset} ({why} {train_images:,} training images of {img_size} px)"
            + (f" with {' '.join(changed)}" if changed else "") + f"; {recipe.describe(batch_size, workers)}")

