"""P6b: loader CPU-seconds per 224-px training image, the float path against timm's prefetcher convention.

Both sides read the same 256-px JPEGs through the DeiT training transform (RandAugment rand-m9-mstd0.5-inc1,
bicubic random-resized crop, flip) in one process with one torch thread, as a DataLoader process runs:
- *float in the loader* (glit_ray before the prefetcher convention): the loader process also normalises each image
  to float32 and erases DeiT's random boxes (probability 0.25, per-pixel noise) before handing it over;
- *uint8 + device* (today): the loader process hands over uint8 images; `DeviceAugment` normalises and erases on the
  training device, batched. Its cost is shown apart: on a GPU it is GPU time, not the loader's CPU.

ratio = float path's loader CPU-s per image / today's (medians of side-by-side epochs; above 1: today's loader
processes do less work per image, so fewer of them feed a GPU). Bytes per image handed over: 4x fewer.

    python bench/loader_cpu.py [--images 192] [--batch 32] [--repeats 5] [--record]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import Compose

from glit_ray.data import DeviceAugment, build_splits
from glit_ray.synthetic import write_imagefolder
from glit_ray.training import seed_all

from harness import publish, spread

IMG_SIZE = 224


def cpu_seconds(loader: DataLoader, finish=None) -> tuple[float, float, int]:
    """(CPU seconds loading, CPU seconds in `finish` per batch, images) over one pass of `loader` in this process."""
    seed_all(0)
    loading = finishing = 0.0
    images, mark = 0, time.process_time()
    for batch, _ in loader:
        loaded = time.process_time()
        loading += loaded - mark
        if finish:
            finish(batch)
        mark = time.process_time()
        finishing += mark - loaded
        images += len(batch)
    return loading, finishing, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192, help="training images per epoch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="side-by-side epochs per side")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader process
    with tempfile.TemporaryDirectory() as tmp:
        classes = 8
        write_imagefolder(Path(tmp), classes, -(-args.images * 5 // 4 // classes), 1, size=256, seed=0)
        splits = build_splits(f"imagefolder:{tmp}", IMG_SIZE, 3)
        today = torch.utils.data.Subset(splits.train.dataset, splits.train.indices[:args.images])
        augment = DeviceAugment(splits, torch.device("cpu"))
        float_view = copy.copy(splits.train.dataset)  # the same files, finished per image in the loader
        float_view.transform = Compose([float_view.transform, lambda image: augment(image[None])[0]])
        before = torch.utils.data.Subset(float_view, today.indices)
        loaders = {"float in the loader": DataLoader(before, args.batch), "uint8 + device": DataLoader(today, args.batch)}
        per_image: dict[str, list[float]] = {name: [] for name in loaders}
        device_side: list[float] = []
        for name, loader in loaders.items():  # warm-up: file cache, allocator
            cpu_seconds(loader)
        for i in range(args.repeats):
            for name in (loaders if i % 2 == 0 else reversed(list(loaders))):
                on_device = name == "uint8 + device"
                loading, finishing, images = cpu_seconds(loaders[name], augment if on_device else None)
                per_image[name].append(loading / images)
                if on_device:
                    device_side.append(finishing / images)
        bytes_per_image = {name: next(iter(loader))[0][0].element_size() * 3 * IMG_SIZE ** 2
                           for name, loader in loaders.items()}
    ratio = statistics.median(per_image["float in the loader"]) / statistics.median(per_image["uint8 + device"])
    rows = [f"| {name} | {spread(values, 1e3)} | {bytes_per_image[name] / 1e3:.0f} |" for name, values in per_image.items()]
    publish("P6b", "\n".join([
        f"{args.images} training images of a synthetic 256-px JPEG folder a side, batch {args.batch}, one process with "
        f"one torch thread (a DataLoader process), {args.repeats} epochs a side alternating after one warm-up each.", "",
        "| side | loader CPU ms per image (min / median / max) | kB per image handed over |",
        "| --- | ---: | ---: |", *rows, "",
        f"Today's normalisation and erasing, where the batch is (here the CPU; on a GPU, GPU time): "
        f"{spread(device_side, 1e3)} ms per image.", "",
        f"**ratio float path / today's, loader CPU per image (medians): {ratio:.2f}**",
    ]), args.record)


if __name__ == "__main__":
    main()
