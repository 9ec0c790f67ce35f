"""P12: peak memory of a training step at 224 px with and without gradient checkpointing (`--grad-checkpointing`).

Each side is a fresh process that builds the network, then runs one forward and backward pass of a batch of
224-px images: GLiT-Base as retraining trains it, and a path of the Base supernet's high level as supernet
training does. The step's memory is the process's peak resident memory after the pass minus before it (on a
GPU it would be `torch.cuda.max_memory_allocated`; this machine has none, so these are CPU figures).

ratio = peak step memory with checkpointing / without (below 1: checkpointing saves that share).

    python bench/grad_checkpointing.py [--batch 16] [--record]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from harness import publish

STEP = """
import json, random, resource, sys, time
import torch
import glit_ray
from glit_ray.space import SearchSpace
from glit_ray.supernet import GLiTSupernet
torch.manual_seed(0)
which, checkpointing, batch = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
space = SearchSpace.load("glit_base")
if which == "retrain":
    net = glit_ray.GLiT(glit_ray.model.published_arch(space), space, num_classes=1000)
    forward = net
else:
    net = GLiTSupernet(space, "high", num_classes=1000)
    path = space.sample("high", random.Random(0))
    forward = lambda x: net(x, path)
net.train().set_grad_checkpointing(checkpointing)
images = torch.randn(batch, 3, 224, 224)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
forward(images).logsumexp(-1).mean().backward()
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step_mib": (peak - before) / 1024, "seconds": seconds}))
"""


def step(which: str, checkpointing: str, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, which, checkpointing, str(batch)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    rows, ratios = [], []
    for which in ("retrain", "supernet"):
        off, on = step(which, "off", args.batch), step(which, "on", args.batch)
        ratios.append(on["step_mib"] / off["step_mib"])
        rows.append(f"| {which} | {off['step_mib']:.0f} | {on['step_mib']:.0f} | **{ratios[-1]:.2f}** | "
                    f"{off['seconds']:.1f} / {on['seconds']:.1f} |")
        print(rows[-1], flush=True)
    publish("P12", "\n".join([
        f"GLiT-Base (embedding 768, 12 heads), one forward and backward pass of {args.batch} random 224-px images on "
        "the CPU, each side in a fresh process; MiB of peak resident memory the step added.", "",
        "| network | step MiB without | step MiB with | ratio with / without | seconds without / with |",
        "| --- | ---: | ---: | ---: | ---: |", *rows,
    ]), args.record)


if __name__ == "__main__":
    main()
