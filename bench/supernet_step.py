"""P1: a supernet training step on a sampled path against the extracted standalone subnet's step.

Both sides run the real training step (`glit_ray.training.loop.RecipeState.step`: forward, label-smoothed
loss, backward, gradient clipping, AdamW, schedule; AMP on a GPU) on the same batch: the supernet
through the sampled path (`net(images, arch)`), and `supernet.extract(arch)`, the standalone GLiT
holding the same weights. What differs is what weight sharing costs: looking the path's modules up,
and an optimizer and a gradient clip over a supernet whose unused weights have no gradient.

ratio = standalone step time / supernet step time (1.0: weight sharing is free; target >= 0.95).

    python bench/supernet_step.py [--space glit_tiny] [--batch 8] [--paths 3] [--warmup 3] [--repeats 10] [--record]
"""
from __future__ import annotations

import argparse
import random
import statistics

import torch

from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet
from glit_ray.training.loop import RecipeState
from glit_ray.training.recipe import PRESETS

from harness import paired, publish, spread, training_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="glit_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--paths", type=int, default=3, help="sampled paths, each timed on both sides")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    dev = training_device()
    torch.manual_seed(0)
    space = SearchSpace.load(args.space)
    supernet = GLiTSupernet(space, "high", num_classes=1000).to(dev)
    images = torch.randn(args.batch, space.in_chans, space.img_size, space.img_size, device=dev)
    labels = torch.randint(0, 1000, (args.batch,), device=dev)

    def training_step(net, forward):
        recipe = RecipeState.build(net, PRESETS["deit"], lr=1e-4, epochs=1, steps_per_epoch=10**6, device=dev)
        params = list(net.parameters())
        return lambda: recipe.step([forward], params, images, labels, 0)

    rows, ratios = [], []
    for p in range(args.paths):
        arch = space.sample("high", random.Random(p))
        standalone = supernet.extract(arch).train()
        on_path = training_step(supernet, lambda x, a=arch: supernet(x, a))
        alone = training_step(standalone, standalone)
        times_super, times_alone = paired(on_path, alone, args.warmup, args.repeats)
        ratio = statistics.median(times_alone) / statistics.median(times_super)
        ratios.append(ratio)
        rows.append(f"| {p} | `{arch}` | {spread(times_super, 1e3)} | {spread(times_alone, 1e3)} | {ratio:.3f} |")
        print(rows[-1], flush=True)
    amp = "bfloat16 AMP" if dev.type == "cuda" else "fp32"
    body = "\n".join([
        f"{args.space}, batch {args.batch}, {dev.type} ({amp}); step times in ms, min / median / max of "
        f"{args.repeats} after {args.warmup} warm-up steps; ratio = standalone median / supernet median.", "",
        "| path | architecture | supernet step ms | standalone step ms | ratio |",
        "| ---: | --- | ---: | ---: | ---: |", *rows, "",
        f"**ratio over {args.paths} paths (min / median / max): {spread(ratios)}** (target >= 0.95)",
    ])
    publish("P1", body, args.record)


if __name__ == "__main__":
    main()
