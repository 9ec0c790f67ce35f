"""`python -m glit_ray.synthetic PATH [--digits]`: write a learnable ImageNet-layout folder, no download needed.

The real path (224-px JPEGs decoded, augmented with the DeiT recipe, class-sorted ImageFolder files)
is what the 8x8 digits cannot show; this writes data that walks it. Each class is a hue and a
texture (stripes of one angle and frequency; five textures share each hue) under colour blobs and
noise, at random phase, contrast and shade, so a network has something to learn that the DeiT
augmentation keeps, and no two images are alike. PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg,
as `--data imagefolder:PATH` reads them. `--digits` writes the shipped digits as PNGs instead: real
handwriting, the small user folder the training recipes are measured on (BENCHMARKS.md, P13r).
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image

from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.progress import bar, driver_has_terminal
from glit_ray.training.data import load_digits


# Each class is a hue group and one of these textures (stripe angle in degrees, cycles per image side). A
# horizontal flip maps each texture to itself (the 45-degree stripes are drawn at +45 or -45 at random), so the
# DeiT recipe's flips keep an image in its class; crops, rotations and colour ops only blur the cues.
TEXTURES = ((0, 4), (90, 4), (0, 12), (90, 12), (45, 8))


def synthetic_image(label: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label`: its hue's striped texture under colour blobs and noise, as an RGB PIL image."""
    hues = -(-classes // len(TEXTURES))
    hue, texture = divmod(label, len(TEXTURES))
    degrees, cycles = TEXTURES[texture]
    angle = math.radians(degrees) * rng.choice((-1, 1))
    colour = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.2, 0.2)) / hues, rng.uniform(0.5, 0.8),
                                          rng.uniform(0.5, 0.7)), dtype=np.float32)
    frequency = 2 * math.pi * cycles * rng.uniform(0.85, 1.15) / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    grating = np.sin(frequency * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    image = colour * (1 + rng.uniform(0.3, 0.6) * grating[..., None])
    for _ in range(rng.integers(1, 4)):  # colour blobs that belong to no class
        (cx, cy), radius = rng.uniform(0, size, 2), rng.uniform(size / 16, size / 6)
        mask = ((x - cx) ** 2 + (y - cy) ** 2 < radius ** 2)[..., None]
        image = np.where(mask, 0.5 * image + 0.5 * rng.uniform(0, 1, 3), image)
    image += rng.normal(0, 0.05, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def write_imagefolder(root: Path, classes: int = 10, train_per_class: int = 30, val_per_class: int = 10,
                      size: int = 256, seed: int = 0, progress: bool = False) -> Path:
    """Write ROOT/{train,val}/class_NNN/NNNNN.jpg; returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": train_per_class, "val": val_per_class}
    done = bar(classes * sum(counts.values()), f"writing {root}", progress)
    for split, per_class in counts.items():
        for label in range(classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                synthetic_image(label, classes, size, rng).save(folder / f"{i:05d}.jpg", quality=90)
                done.update(1)
    done.close()
    return root


def write_digits_folder(root: Path, size: int = 28) -> Path:
    """The shipped digits (`data.load_digits`) as a small real ImageNet-layout folder: ROOT/{train,val}/digit_N/*.png,
    each 8x8 glyph scaled to `size` px (bicubic), the data set's own test fifth under val/. Returns ROOT."""
    root = Path(root)
    pixels, labels = load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    test = set(order[:round(0.2 * len(labels))].tolist())
    for i, (glyph, label) in enumerate(zip(pixels, labels)):
        folder = root / ("val" if i in test else "train") / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((glyph.astype(np.float32) * (255 / 16)).round().astype(np.uint8), mode="L")
        image.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m glit_ray.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=None,
                        help="pixels per side (default: 256, as ImageNet's short side; 28 with --digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", action="store_true",
                        help="write the shipped 8x8 digits as --size-px PNGs instead (1,438 train + 359 val; a small "
                             "real data set)")
    args = parser.parse_args(argv)
    args.size = args.size or (28 if args.digits else 256)
    if args.path.exists() and (not args.path.is_dir() or any(args.path.iterdir())):
        raise UserError(f"{args.path} is not an empty folder; give a new folder")
    for name in ("classes", "train_per_class", "val_per_class", "size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        if args.digits:
            write_digits_folder(args.path, args.size)
            print(f"wrote the digits as {args.size}-px PNGs to {args.path}; use --data imagefolder:{args.path}")
            return
        write_imagefolder(args.path, args.classes, args.train_per_class, args.val_per_class, args.size, args.seed,
                          driver_has_terminal())
    except OSError as exc:  # a path it may not create, a full disk
        raise UserError(f"cannot write {exc.filename or args.path} ({exc.strerror}); give a folder you can write "
                        "with room for the images") from None
    print(f"wrote {args.classes} classes x ({args.train_per_class} train + {args.val_per_class} val) "
          f"{args.size}-px JPEGs to {args.path}; use --data imagefolder:{args.path}")


if __name__ == "__main__":
    run(main)
