"""P6: the training input pipeline at 224 px with the DeiT recipe, default settings against the best found.

Both sides are the training DataLoader exactly as a Ray Train worker builds it
(`glit_ray.training.loaders.training_loader`: `SeededSamples` + `EpochSampler`, pinned batches on a GPU) over
224-px crops of 256-px JPEGs with timm's DeiT training transform (RandAugment rand-m9-mstd0.5-inc1,
uint8 out; random erasing runs on the device since issue 26). The default is what the training
entry points give a worker holding all the machine's CPUs: `default_loader_workers(data, cores)`
loader processes, persistent, DataLoader's default prefetch. The sweep tries 0 to 4 loader processes (at most 2 per core), prefetch 2 and 4,
persistent or restarted every epoch; then the default and the best other setting run side by side,
alternating whole epochs. Only loading is timed (each batch is moved to the device, nothing trains).

ratio = default images/s / best other setting's images/s, medians of the side-by-side epochs
(target >= 0.9; above 1: the default is the best setting found).

    python bench/input_pipeline.py [--data imagefolder:PATH] [--classes 20] [--train-per-class 40] [--batch 64]
                                   [--repeats 3] [--paired-repeats 6] [--max-workers 4] [--record]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from glit_ray.core.errors import UserError
from glit_ray.synthetic import write_imagefolder
from glit_ray.training.data import build_splits
from glit_ray.training.flags import check_epoch_has_a_step
from glit_ray.training.loaders import default_loader_workers, training_loader

from harness import device, paired, publish, spread, sync

IMG_SIZE = 224


@dataclass(frozen=True)
class Setting:
    workers: int
    prefetch: int | None = None     # None: DataLoader's default
    persistent: bool | None = None  # None: training_loader's default (persistent when workers > 0)

    def options(self) -> dict:
        options = {}
        if self.workers and self.prefetch is not None:
            options["prefetch_factor"] = self.prefetch
        if self.workers and self.persistent is not None:
            options["persistent_workers"] = self.persistent
        return options

    def __str__(self) -> str:
        if not self.workers:
            return "0 (in the training process)"
        return (f"{self.workers} loader process{'es' if self.workers > 1 else ''}, prefetch {self.prefetch}, "
                f"{'persistent' if self.persistent else 'restarted each epoch'}")


def setting_of(loader: DataLoader) -> Setting:
    """What a built loader actually runs with."""
    if not loader.num_workers:
        return Setting(0)
    return Setting(loader.num_workers, loader.prefetch_factor, loader.persistent_workers)


class Side:
    """One loader, run a whole epoch at a time (the sampler's epoch advancing, as training does)."""

    def __init__(self, loader: DataLoader, dev):
        self.loader, self.dev, self.epoch = loader, dev, 0

    def run_epoch(self) -> None:
        self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for images, labels in self.loader:
            images.to(self.dev, non_blocking=True), labels.to(self.dev, non_blocking=True)

    def timed_epoch(self) -> float:
        sync()
        started = time.perf_counter()
        self.run_epoch()
        sync()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="imagefolder:PATH of 256-px JPEGs (default: write a synthetic one "
                                                     "into a temporary folder)")
    parser.add_argument("--classes", type=int, default=20, help="synthetic classes")
    parser.add_argument("--train-per-class", type=int, default=40, help="synthetic training images per class")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per setting in the sweep")
    parser.add_argument("--paired-repeats", type=int, default=6, help="timed epochs per side, default against best")
    parser.add_argument("--max-workers", type=int, default=4, help="most loader processes tried (and at most 2 per core)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    # up to 2 loader processes per core on purpose: torch's "more workers than cores" warning is expected
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            started = time.perf_counter()
            write_imagefolder(Path(tmp), args.classes, args.train_per_class, 1, size=256, seed=0)
            data = f"imagefolder:{tmp}"
            print(f"wrote {args.classes} x {args.train_per_class} training JPEGs in {time.perf_counter() - started:.1f} s",
                  flush=True)
        body = measure(args, data)
    publish("P6", body, args.record)


def measure(args, data: str) -> str:
    dev, cores = device(), len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    splits = build_splits(data, IMG_SIZE, 3)

    def loader(workers: int, **options) -> DataLoader:
        return training_loader(splits, args.batch, 0, workers, dev, **options)

    try:
        check_epoch_has_a_step(len(splits.train), args.batch, 1, "lower --batch or write more (--train-per-class)")
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    default_loader = loader(default_loader_workers(data, cores))  # exactly what a worker holding all CPUs gets
    default = setting_of(default_loader)
    images = len(default_loader) * args.batch
    del default_loader
    settings = [Setting(0)] + [Setting(w, p, persistent) for w in range(1, min(args.max_workers, 2 * cores) + 1)
                               for p in (2, 4) for persistent in (True, False)]
    if default not in settings:
        settings.append(default)

    rows, medians = [], {}
    for setting in settings:
        side = Side(loader(setting.workers, **setting.options()), dev)
        first = side.timed_epoch()  # loader processes start in here
        rates = [images / side.timed_epoch() for _ in range(args.repeats)]
        medians[setting] = statistics.median(rates)
        mark = " (default)" if setting == default else ""
        rows.append(f"| {setting}{mark} | {images / first:.0f} | {spread(rates)} |")
        print(rows[-1], flush=True)
        del side
        gc.collect()  # the persistent loader processes end with their loader

    best = max((s for s in settings if s != default), key=medians.get)
    default_side = Side(loader(default.workers), dev)  # built as training builds it: no options
    best_side = Side(loader(best.workers, **best.options()), dev)
    times_default, times_best = paired(default_side.timed_epoch, best_side.timed_epoch, 1, args.paired_repeats)
    rate_default = [images / t for t in times_default]
    rate_best = [images / t for t in times_best]
    ratio = statistics.median(rate_default) / statistics.median(rate_best)
    load_after = os.getloadavg()[0]
    busy = " (above the core count: other work shared the CPUs, so the figures are noisy)" if max(
        load_before, load_after) > cores + 0.5 else ""
    source = (f"`{args.data}`" if args.data else
              f"synthetic imagefolder ({args.classes} classes x {args.train_per_class} 256-px JPEGs)")
    sweep_best = max(settings, key=medians.get)
    if ratio >= 1:
        verdict = "the default is the fastest setting found" + ("" if sweep_best == default else " side by side")
    elif ratio >= 0.9:
        verdict = f"within target of the best other setting ({best}, {1 / ratio - 1:.0%} faster)"
    else:
        verdict = f"**below target**: {best} is {1 / ratio - 1:.0%} faster"
    return "\n".join([
        f"{source}, {IMG_SIZE}-px DeiT training transform, batch {args.batch}, {len(splits.train)} training images = "
        f"{images // args.batch} batches per epoch, {dev.type}, {cores} cores; default = "
        f"`default_loader_workers(data, {cores})` = {default.workers} loader process(es), nothing else set. "
        f"images/s per epoch; *first epoch* includes starting the loader processes, *steady* is min / median / max "
        f"of {args.repeats} epochs after it.", "",
        "| loader setting | first epoch images/s | steady images/s |",
        "| --- | ---: | ---: |", *rows, "",
        f"Side by side, alternating whole epochs: {args.paired_repeats} per side after one warm-up epoch each.", "",
        "| side | setting | images/s (min / median / max) |",
        "| --- | --- | ---: |",
        f"| default | {default} | {spread(rate_default)} |",
        f"| best other | {best} | {spread(rate_best)} |", "",
        f"**ratio default / best other (medians): {ratio:.3f}** (target >= 0.9); {verdict}", "",
        f"Load average (1 min) at the start / end of the measurement: {load_before:.1f} / {load_after:.1f} on {cores} "
        f"cores{busy}.",
    ])


if __name__ == "__main__":
    main()
