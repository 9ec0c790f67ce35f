"""P6b: loader CPU-seconds per 224-px training image, the float path against timm's prefetcher convention.

Both sides read the same 256-px JPEGs through the DeiT training transform (RandAugment rand-m9-mstd0.5-inc1,
bicubic random-resized crop, flip) in one process with one torch thread, as a DataLoader process runs:
- *float in the loader* (glit_ray before the prefetcher convention): the loader process also normalises each image
  to float32 and erases DeiT's random boxes (probability 0.25, per-pixel noise) before handing it over;
- *uint8 + device* (today): the loader process hands over uint8 images; `DeviceAugment` normalises and erases on the
  training device, batched. Its cost is shown apart: on a GPU it is GPU time, not the loader's CPU.

ratio = float path's loader CPU-s per image / today's (medians of side-by-side epochs; above 1: today's loader
processes do less work per image, so fewer of them feed a GPU). Bytes per image handed over: 4x fewer.

Then the two ingests at the same CPU count (all the machine's cores): a DataLoader with one loader process per core
(`--ingest loader`, as a Ray Train worker holding them builds it) against Ray Data tasks on a local Ray of as many
CPUs (`--ingest ray-data`, `glit_ray.training.ingest.RayDataFeed`), each streaming the same epoch's batches to this process;
images/s and the machine's CPU-seconds per image (every process: Ray's own included), alternating epochs.

    python bench/loader_cpu.py [--images 384] [--batch 32] [--repeats 5] [--record]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import Compose

from glit_ray.cluster import ray_workarounds
from glit_ray.synthetic import write_imagefolder
from glit_ray.training.data import DeviceAugment, build_splits
from glit_ray.training.ingest import RayDataFeed
from glit_ray.training.loaders import EpochSampler, SeededSamples, seed_all, shard_of, training_loader

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


def machine_cpu_seconds() -> float:
    """CPU-seconds every process of the machine has used (/proc/stat: user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:8]
    return (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")


def ingest_epochs(splits, batch: int, cores: int, repeats: int) -> dict[str, list[tuple[float, float, int]]]:
    """(seconds, machine CPU-seconds, images) of side-by-side epochs of the DataLoader and of Ray Data, `cores` each."""
    import ray

    ray_workarounds.apply()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset lines, in this driver's console
    ray.init(address="local", num_cpus=cores, log_to_driver=False, configure_logging=False)
    feeds = {"DataLoader": training_loader(splits, batch, 0, cores, torch.device("cpu")),
             "Ray Data": RayDataFeed(SeededSamples(splits.train, 0), EpochSampler(shard_of(splits, 0, 1, 0)), batch)}
    epochs: dict[str, list] = {name: [] for name in feeds}
    for epoch in range(repeats + 1):
        for name in (feeds if epoch % 2 == 0 else reversed(list(feeds))):
            feeds[name].sampler.set_epoch(epoch)
            started, cpu = time.perf_counter(), machine_cpu_seconds()
            images = sum(len(batch_images) for batch_images, _ in feeds[name])
            if epoch:  # epoch 0 starts the loader processes and Ray's workers
                epochs[name].append((time.perf_counter() - started, machine_cpu_seconds() - cpu, images))
    ray.shutdown()
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384, help="training images per epoch")
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
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(cores)
        ingests = ingest_epochs(splits, args.batch, cores, args.repeats)
    ratio = statistics.median(per_image["float in the loader"]) / statistics.median(per_image["uint8 + device"])
    rows = [f"| {name} | {spread(values, 1e3)} | {bytes_per_image[name] / 1e3:.0f} |" for name, values in per_image.items()]
    rates = {name: [images / seconds for seconds, _, images in runs] for name, runs in ingests.items()}
    cpu_ms = {name: [cpu / images for _, cpu, images in runs] for name, runs in ingests.items()}
    ingest_rows = [f"| {name} | {spread(rates[name])} | {spread(cpu_ms[name], 1e3)} |" for name in ingests]
    ingest_ratio = statistics.median(rates["Ray Data"]) / statistics.median(rates["DataLoader"])
    publish("P6b", "\n".join([
        f"{args.images} training images of a synthetic 256-px JPEG folder a side, batch {args.batch}, one process with "
        f"one torch thread (a DataLoader process), {args.repeats} epochs a side alternating after one warm-up each.", "",
        "| side | loader CPU ms per image (min / median / max) | kB per image handed over |",
        "| --- | ---: | ---: |", *rows, "",
        f"Today's normalisation and erasing, where the batch is (here the CPU; on a GPU, GPU time): "
        f"{spread(device_side, 1e3)} ms per image.", "",
        f"**ratio float path / today's, loader CPU per image (medians): {ratio:.2f}**", "",
        f"The two ingests at {cores} CPUs, {len(splits.train)} training images an epoch, {args.repeats} epochs each "
        "alternating after one that starts the processes:", "",
        "| ingest | images/s (min / median / max) | machine CPU ms per image |",
        "| --- | ---: | ---: |", *ingest_rows, "",
        f"**ratio Ray Data / DataLoader, images/s at the same CPUs (medians): {ingest_ratio:.2f}**",
    ]), args.record)


if __name__ == "__main__":
    main()
