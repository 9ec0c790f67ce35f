"""`make gpu-check`: the real 224-px path on one GPU with bfloat16, in a few minutes, with its figures.

Writes a 224-px JPEG ImageFolder (`glit_ray.synthetic`, unless --data names one) and measures P10
and P11 on it (`training_feed.py`: the training step fed by its loader at 12 and 4 CPUs against fed
from the device, and the GPU's busy share of a step). Then it runs what a user runs, through the
same functions as the commands: supernet training (`train_supernet`, Ray Train on the GPU, bf16
autocast, loader processes from the worker's CPUs), an evaluator actor scoring candidates (scoring
sets decoded once, on the device or streamed from pinned memory), a short search, and a one-epoch
retrain of its best architecture. Prints images/s of training,
seconds per candidate, the evaluator's device memory, and the wall time of each step; then, from
P10's end-to-end training rate at 12 CPUs per GPU and the measured scoring rate, the cost of the
README's whole protocol on ImageNet on 8 such GPUs (each GPU's rate scaled linearly).

    python bench/gpu_check.py [--space glit_tiny] [--data imagefolder:PATH] [--out DIR]
    python bench/gpu_check.py --allow-cpu --space glit_pico --classes 4 --per-class 20 --batch-size 16   # smoke, no GPU
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.resources import evaluators
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import load_supernet
from glit_ray.retrain import build_parser as retrain_parser
from glit_ray.retrain import retrain, settings_from_args as retrain_settings
from glit_ray.search import build_parser as search_parser
from glit_ray.search import search, settings_from_args as search_settings
from glit_ray.searching.dispatch import Dispatcher
from glit_ray.searching.evaluator import evaluator_pool
from glit_ray.searching.results import read_candidates
from glit_ray.synthetic import write_imagefolder
from glit_ray.train_supernet import supernet_run, train_supernet
from glit_ray.training.data import build_splits
from glit_ray.training.fit import ensure_ray
from glit_ray.training.imagesets import CALIB_BATCH_SIZE, SCORING_DEFAULTS, scoring_sizes

from harness import machine
from training_feed import measure as measure_feed


IMAGENET_TRAIN, IMAGENET_TEST = 1_231_167, 50_000  # ImageNet's training images beside the 50,000 held out; val
GPUS = 8
# the images a search on an image folder scores each candidate on by default: its calibration batches and held-out set
SCORED_PER_CANDIDATE = SCORING_DEFAULTS["imagefolder"][0] * CALIB_BATCH_SIZE + SCORING_DEFAULTS["imagefolder"][1]


def protocol_hours(train_images_per_s: float, score_images_per_s: float) -> list[tuple[str, float]]:
    """Hours of each step of the README's protocol (120 supernet epochs per level, 1,000 candidates per search,
    a shortlist of 5 x 10 epochs, 300 retraining epochs) on GPUS GPUs training and scoring at these rates each."""
    epoch = IMAGENET_TRAIN / (GPUS * train_images_per_s) / 3600
    search = 1000 * SCORED_PER_CANDIDATE / (GPUS * score_images_per_s) / 3600
    return [("high-level supernet, 120 epochs", 120 * epoch), ("high-level search, 1,000 candidates", search),
            ("shortlist, 5 x 10 epochs", 50 * epoch), ("low-level supernet, 120 epochs", 120 * epoch),
            ("low-level search, 1,000 candidates", search), ("retrain, 300 epochs", 300 * epoch),
            ("evaluate, 50,000 images", IMAGENET_TEST / (GPUS * score_images_per_s) / 3600)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="glit_tiny")
    parser.add_argument("--data", help="imagefolder:PATH (default: write a synthetic one under --out)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class of the written folder")
    parser.add_argument("--epochs", type=int, default=2, help="supernet epochs")
    parser.add_argument("--cpus", default="12,4", help="P10's CPU counts (those above this machine's are left out)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=16, help="per search generation (2 generations)")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a smoke test of this script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("error: no CUDA GPU here; run make gpu-check on a GPU machine (or add --allow-cpu for a smoke run)")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    figures, clock = [], time.perf_counter()

    def step(name: str, started: float, detail: str) -> None:
        figures.append((name, time.perf_counter() - started, detail))
        print(f"{name}: {figures[-1][1]:.1f} s, {detail}", flush=True)

    started = time.perf_counter()
    if args.data is None:
        write_imagefolder(out / "data", args.classes, args.per_class, max(2, args.per_class // 10))
        args.data = f"imagefolder:{out / 'data'}"
    space = SearchSpace.load(args.space)
    splits = build_splits(args.data, space.img_size, space.in_chans)
    step("data", started, f"{len(splits.train)} train / {len(splits.heldout)} held-out / {len(splits.test)} test images, "
                          f"{space.img_size} px, {args.data}")

    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    cpus = [c for c in map(int, args.cpus.split(",")) if c <= cores] or [cores]
    p10, p11, end_to_end = measure_feed(splits, space, args.batch_size, cpus, steps=30, warmup=5)
    step("P10 and P11", started, f"the step fed by its loader at {', '.join(map(str, cpus))} CPUs: "
                                 + ", ".join(f"{end_to_end[c]:.0f}" for c in cpus) + " images/s")

    ray_workarounds.apply()  # the commands' console (our lines, not Ray's) and Tune's defaults, before Ray starts
    ensure_ray()
    started = time.perf_counter()
    settings = supernet_run(space, "high", None, args.data, args.epochs, args.batch_size)
    supernet = train_supernet(settings, Placement(out / "supernet"))
    _, meta = load_supernet(supernet)
    step("supernet training", started, f"{args.epochs} epochs of {len(splits.train) // args.batch_size} batches of "
                                       f"{args.batch_size}, last epoch {meta['last_epoch']['images_per_s']:.0f} images/s")

    started = time.perf_counter()
    calib_batches, heldout_images = scoring_sizes(args.data)
    archs = list({str(space.sample("high", random.Random(i))) for i in range(args.candidates)})
    with evaluator_pool(supernet.read_bytes(), splits, calib_batches, heldout_images, evaluators(1, None)) as [actor]:
        ready = ray.get(actor.stats.remote())
        Dispatcher([actor]).score(archs[:2])  # warm-up: allocator, kernels
        scored = time.perf_counter()
        rows = Dispatcher([actor]).score(archs)
        per_candidate = (time.perf_counter() - scored) / len(archs)
        stats = ray.get(actor.stats.remote())
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    calib_images = min(calib_batches * 64, len(splits.calibration))
    scored_images = min(heldout_images or len(splits.heldout), len(splits.heldout))
    score_rate = (calib_images + scored_images) / per_candidate
    step("scoring", started, f"{calib_images} calibration + {scored_images} held-out images, "
                             f"actor ready in {ready['ready_seconds']:.1f} s, {per_candidate:.2f} s per candidate, "
                             f"images on the device {stats['device_image_bytes'] / 2**20:.0f} MiB, "
                             f"device peak {stats['device_peak_bytes'] / 2**30:.2f} GiB")

    started = time.perf_counter()
    argv = ["--level", "high", "--space", args.space, "--data", args.data, "--supernet", str(supernet),
            "--population", str(args.candidates), "--generations", "2", "--mutations", str(args.candidates // 2),
            "--crossovers", str(args.candidates - args.candidates // 2), "--topk", "4", "--out", str(out / "search")]
    best = search(search_settings(search_parser().parse_args(argv)), Placement(out / "search"))
    seconds = [r["eval_seconds"] for r in read_candidates(out / "search").to_pylist()]
    step("search", started, f"{len(seconds)} candidates, median {statistics.median(seconds):.2f} s each, "
                            f"best {best['top1']:.1f}% held-out")

    started = time.perf_counter()
    argv = ["--arch", str(out / "search"), "--epochs", "1", "--batch-size", str(args.batch_size), "--out", str(out / "retrain")]
    metrics = retrain(retrain_settings(retrain_parser().parse_args(argv)), Placement(out / "retrain"))
    step("retrain", started, f"1 epoch, test top-1 {metrics['test_top1']:.1f}%")

    total = time.perf_counter() - clock
    print(f"\n{machine()}\n")
    print("| step | seconds | figures |\n| --- | ---: | --- |")
    for name, seconds, detail in figures:
        print(f"| {name} | {seconds:.1f} | {detail} |")
    print(f"| total | {total:.1f} | target: under 300 s on one GPU |")
    print(f"\nP10, the training feed:\n\n{p10}\n\nP11, the GPU's busy share of a step:\n\n{p11}")
    train_rate = end_to_end[max(cpus)]
    print(f"\nThe README's protocol on ImageNet with {args.space} on {GPUS} such GPUs, from this GPU's {train_rate:.0f} "
          f"training images/s (P10, end to end at {max(cpus)} CPUs) and {score_rate:.0f} scoring images/s:"
          "\n\n| step | hours |\n| --- | ---: |")
    hours = protocol_hours(train_rate, score_rate)
    for name, value in hours:
        print(f"| {name} | {value:.1f} |")
    print(f"| in all | {sum(value for _, value in hours):.1f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
