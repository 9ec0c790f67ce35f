"""P12: peak memory of a training step at 224 px with and without gradient checkpointing (`--grad-checkpointing`).

Each side is a fresh process that builds GLiT-Base, as retraining trains it, or the Base supernet's high level with
a sampled path, as supernet training does, and runs batches of 224-px images through it.

- On a GPU: two whole training steps (`Recipe.step`: bfloat16 autocast, fused AdamW, clipping), the second one
  measured: `torch.cuda.max_memory_allocated` over it, weights, gradients and AdamW's state included, the figure
  that says whether Base trains on a 24 GB card at that batch.
- On a CPU: one forward and backward pass; the process's peak resident memory after it minus before it.

ratio = peak step memory with checkpointing / without (below 1: checkpointing saves that share).

    python bench/grad_checkpointing.py [--batch 16 on a CPU, 64 on a GPU: DeiT-Base's 1,024 over 16 GPUs] [--record]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from harness import publish

STEP = """
import json, random, resource, sys, time
import torch
import glit_ray
from glit_ray.space import SearchSpace
from glit_ray.supernet import GLiTSupernet
from glit_ray.training import Recipe, use_fast_gpu_kernels
torch.manual_seed(0)
which, checkpointing, batch = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
space = SearchSpace.load("glit_base")
if which == "retrain":
    net = glit_ray.GLiT(glit_ray.model.published_arch(space), space, num_classes=1000)
    forward = net
else:
    net = GLiTSupernet(space, "high", num_classes=1000)
    path = space.sample("high", random.Random(0))
    forward = lambda x: net(x, path)
net.to(dev).train().set_grad_checkpointing(checkpointing)
images = torch.randn(batch, 3, 224, 224, device=dev)
if dev.type == "cuda":
    use_fast_gpu_kernels()
    recipe, params = Recipe.deit(net, 1e-3, 1, 10, dev), list(net.parameters())
    labels = torch.randint(0, 1000, (batch,), device=dev)
    recipe.step(forward, params, images, labels, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe.step(forward, params, images, labels, 1)
    torch.cuda.synchronize()
    seconds, step_mib = time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**20
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    forward(images).logsumexp(-1).mean().backward()
    seconds = time.perf_counter() - started
    step_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"step_mib": step_mib, "seconds": seconds}))
"""


def step(which: str, checkpointing: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, which, checkpointing, str(batch)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=64 if gpu else 16)
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    rows, ratios = [], []
    for which in ("retrain", "supernet"):
        off, on = step(which, "off", args.batch), step(which, "on", args.batch)
        ratios.append(on["step_mib"] / off["step_mib"])
        rows.append(f"| {which} | {off['step_mib']:.0f} | {on['step_mib']:.0f} | **{ratios[-1]:.2f}** | "
                    f"{off['seconds']:.1f} / {on['seconds']:.1f} |")
        print(rows[-1], flush=True)
    if gpu:
        what = (f"two training steps (bfloat16 autocast, fused AdamW) of {args.batch} random 224-px images on "
                f"{torch.cuda.get_device_name()}, each side in a fresh process; MiB of `torch.cuda.max_memory_allocated` "
                "over the second step: weights, gradients, AdamW's state and activations (24 GB are 22,888 MiB, less "
                "the card's CUDA context)")
    else:
        what = (f"one forward and backward pass of {args.batch} random 224-px images on the CPU, each side in a fresh "
                "process; MiB of peak resident memory the step added")
    publish("P12", "\n".join([
        f"GLiT-Base (embedding 768, 12 heads), {what}.", "",
        "| network | step MiB without | step MiB with | ratio with / without | seconds without / with |",
        "| --- | ---: | ---: | ---: | ---: |", *rows,
    ]), args.record)


if __name__ == "__main__":
    main()
