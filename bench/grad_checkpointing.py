"""P12: peak memory of a training step at 224 px with and without gradient checkpointing (`--grad-checkpointing`).

Each side is a fresh process that builds GLiT-Base, as retraining trains it, or the Base supernet's high level with
a sampled path, as supernet training does, and runs batches of 224-px images through it.

- Measured on a GPU: two whole training steps (`RecipeState.step`: bfloat16 autocast, fused AdamW, clipping), the second
  one measured: `torch.cuda.max_memory_allocated` over it, weights, gradients and AdamW's state included, the figure
  that says whether Base trains on a 24 GB card at that batch.
- Measured on a CPU: one forward and backward pass; the process's peak resident memory after it minus before it.
- Modelled, on any machine: the GPU's step at DeiT-Base's 64 images a GPU, run on fake tensors (nothing computed)
  under bfloat16 autocast, with torch's `MemTracker` adding up every tensor alive at the second step's peak, in the
  caching allocator's 512-byte blocks. It leaves out what the allocator holds beyond the live tensors and the CUDA
  context; on a GPU the measured/modelled column says how far that is.

ratio = peak step memory with checkpointing / without (below 1: checkpointing saves that share).

    python bench/grad_checkpointing.py [--batch 16 on a CPU, 64 on a GPU: DeiT-Base's 1,024 over 16 GPUs]
                                       [--model-batch 64] [--record]
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
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet
from glit_ray.training.loop import RecipeState, use_fast_gpu_kernels
from glit_ray.training.recipe import PRESETS
import glit_ray
which, checkpointing, batch, how = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3]), sys.argv[4]


def build(dev):
    torch.manual_seed(0)
    space = SearchSpace.load("glit_base")
    with dev:  # built where it runs (a fake tensor cannot be moved)
        if which == "retrain":
            net = glit_ray.GLiT(glit_ray.models.glit.published_arch(space), space, num_classes=1000)
            forward = net
        else:
            net = GLiTSupernet(space, "high", num_classes=1000)
            path = space.sample("high", random.Random(0))
            forward = lambda x: net(x, path)
        images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    net.train().set_grad_checkpointing(checkpointing)
    return net, forward, images, labels, RecipeState.build(net, PRESETS["deit"], 1e-3, 1, 10, dev), list(net.parameters())


started = time.perf_counter()
if how == "model":
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():  # tensors with shapes and no data: nothing is computed
        net, forward, images, labels, recipe, params = build(torch.device("cpu"))
        recipe.amp_dtype = torch.bfloat16  # the GPU's autocast (fake CUDA tensors cannot run a backward pass here)
        recipe.step([forward], params, images, labels, 0)  # AdamW's state exists from here on
        tracker = MemTracker()
        tracker.track_external(net, recipe.optimizer, images, labels)
        with tracker:
            recipe.step([forward], params, images, labels, 1)
    step_mib = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20
elif torch.cuda.is_available():
    use_fast_gpu_kernels()
    net, forward, images, labels, recipe, params = build(torch.device("cuda"))
    recipe.step([forward], params, images, labels, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe.step([forward], params, images, labels, 1)
    torch.cuda.synchronize()
    step_mib = torch.cuda.max_memory_allocated() / 2**20
else:
    net, forward, images, labels, _, _ = build(torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    forward(images).logsumexp(-1).mean().backward()
    step_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"step_mib": step_mib, "seconds": time.perf_counter() - started}))
"""


def step(which: str, checkpointing: str, batch: int, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, which, checkpointing, str(batch), how], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sides(how: str, batch: int) -> dict[str, tuple[dict, dict]]:
    """Per network, its step without checkpointing and with, each in a fresh process."""
    return {which: (step(which, "off", batch, how), step(which, "on", batch, how)) for which in ("retrain", "supernet")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=64 if gpu else 16, help="images of the measured step")
    parser.add_argument("--model-batch", type=int, default=64, help="images of the modelled GPU step")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    measured, modelled = sides("measure", args.batch), sides("model", args.model_batch)
    compare = gpu and args.batch == args.model_batch
    rows = [f"| {which} | {off['step_mib']:.0f} | {on['step_mib']:.0f} | **{on['step_mib'] / off['step_mib']:.2f}** | "
            f"{off['seconds']:.1f} / {on['seconds']:.1f} |" for which, (off, on) in measured.items()]
    model_rows = []
    for which, (off, on) in modelled.items():
        row = f"| {which} | {off['step_mib']:.0f} | {on['step_mib']:.0f} | **{on['step_mib'] / off['step_mib']:.2f}** |"
        if compare:
            row += "".join(f" {m['step_mib'] / f['step_mib']:.2f} |" for m, f in zip(measured[which], (off, on)))
        model_rows.append(row)
    if gpu:
        what = (f"two training steps (bfloat16 autocast, fused AdamW) of {args.batch} random 224-px images on "
                f"{torch.cuda.get_device_name()}, each side in a fresh process; MiB of `torch.cuda.max_memory_allocated` "
                "over the second step: weights, gradients, AdamW's state and activations (24 GB are 22,888 MiB, less "
                "the card's CUDA context)")
    else:
        what = (f"one forward and backward pass of {args.batch} random 224-px images on the CPU, each side in a fresh "
                "process; MiB of peak resident memory the step added")
    publish("P12", "\n".join([
        f"Measured: GLiT-Base (embedding 768, 12 heads), {what}.", "",
        "| network | step MiB without | step MiB with | ratio with / without | seconds without / with |",
        "| --- | ---: | ---: | ---: | ---: |", *rows, "",
        f"Modelled: the GPU's training step (bfloat16 autocast, fused AdamW, clipping) of {args.model_batch} 224-px "
        "images, run on fake tensors; MiB of the tensors alive at the second step's peak (torch's MemTracker: "
        "weights, gradients, AdamW's state, activations and the batch), before the allocator's own slack and the CUDA "
        "context.", "",
        "| network | peak MiB without | peak MiB with | ratio with / without |"
        + (" measured / modelled without | with |" if compare else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if compare else ""), *model_rows,
    ]), args.record)


if __name__ == "__main__":
    main()
