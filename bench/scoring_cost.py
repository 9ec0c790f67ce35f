"""P2: scoring one candidate (BatchNorm recalibration + held-out pass) against the bare forward passes.

The scoring side is the search's own evaluator (`glit_ray.searching.evaluator.Evaluator.score`, in this
process, one torch thread as each of 2 CPU actors has): reset BatchNorm statistics, recalibrate
them on the calibration batches in train mode, then top-1/top-5/loss on the held-out batches. The
bare side runs the same path forward over the same images (calibration and held-out batches, eval
mode, no grad) and nothing else. What the ratio shows is scoring's own overhead.

ratio = scoring time / bare forward time (target <= 1.10).

    python bench/scoring_cost.py [--space glit_micro] [--data digits] [--calib-batches 4] [--paths 5] [--record]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from glit_ray.models.arch import Architecture
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet, save_supernet
from glit_ray.searching.evaluator import Evaluator
from glit_ray.training.data import build_splits
from glit_ray.training.imagesets import CALIB_BATCH_SIZE, EVAL_BATCH_SIZE, scoring_sets, scoring_sizes

from harness import device, paired, publish, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="glit_micro")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--calib-batches", type=int, default=None, help="default: the search's for --data")
    parser.add_argument("--heldout-images", type=int, default=None, help="default: the search's for --data")
    parser.add_argument("--paths", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a CPU evaluator actor's share)")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    space = SearchSpace.load(args.space)
    splits = build_splits(args.data, space.img_size, space.in_chans)
    args.calib_batches, args.heldout_images = scoring_sizes(args.data, args.calib_batches, args.heldout_images)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_supernet(GLiTSupernet(space, "high", num_classes=splits.num_classes), Path(tmp) / "supernet.pt")
        supernet_bytes = (Path(tmp) / "supernet.pt").read_bytes()
    evaluator = Evaluator(supernet_bytes, scoring_sets(splits, args.calib_batches, args.heldout_images), 0,
                          threads=args.threads)
    sets, on = evaluator.sets, evaluator.device
    images = sum(len(s) for s in sets.values())

    @torch.no_grad()
    def bare(arch: Architecture) -> None:
        evaluator.net.eval()
        with evaluator.autocast:  # bfloat16 on a GPU, as scoring runs
            for x, _ in sets["calibration"].batches(CALIB_BATCH_SIZE, on):
                evaluator.net(x, arch)
            for x, _ in sets["heldout"].batches(EVAL_BATCH_SIZE, on):
                evaluator.net(x, arch)

    rows, ratios = [], []
    for p in range(args.paths):
        arch = space.sample("high", random.Random(p))
        scoring, forward = paired(lambda a=arch: evaluator.score(str(a)), lambda a=arch: bare(a), args.warmup, args.repeats)
        ratio = statistics.median(scoring) / statistics.median(forward)
        ratios.append(ratio)
        rows.append(f"| {p} | `{arch}` | {spread(scoring, 1e3)} | {spread(forward, 1e3)} | {ratio:.3f} |")
        print(rows[-1], flush=True)
    body = "\n".join([
        f"{args.space} on {args.data}, {device().type}, {args.threads} torch thread(s): {args.calib_batches} calibration "
        f"batches + {len(sets['heldout'])} held-out images = {images} images per candidate; times in ms, "
        f"min / median / max of {args.repeats} after {args.warmup} warm-up rounds; ratio = scoring median / bare median.", "",
        "| path | architecture | scoring ms | bare forward ms | ratio |",
        "| ---: | --- | ---: | ---: | ---: |", *rows, "",
        f"**ratio over {args.paths} paths (min / median / max): {spread(ratios)}** (target <= 1.10)",
    ])
    publish("P2", body, args.record)
    ray.shutdown()


if __name__ == "__main__":
    main()
