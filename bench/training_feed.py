"""P10 and P11: whether the supernet's training step waits for its input, and whether the device waits for the step.

Both run the step a Ray Train worker runs (`RecipeState.step` on the high-level supernet, a new sampled path each step:
on-device normalising, erasing and mixup/cutmix, autocast on a GPU, fused AdamW, clipping, the schedule) on one
device, on a 224-px ImageFolder (written under --out unless --data names one).

P10, the feed: images/s of the step fed end to end by the training loader (`loaders.training_loader`: DeiT's
transform in one loader process per CPU, uint8 batches pinned and copied), this process and its loader processes
held to N CPUs (12: a p4d's share of a GPU; 4: a g5.xlarge's), divided by the same step fed from batches already
on the device, held to the same CPUs. Target >= 0.9 at 12. On a CPU the step and the loader share those cores.

P11, the device: the share of the step's wall time the device spends running kernels (their union in a
torch.profiler trace of the steps over the steps' wall time: see `busy_share`), fed from the device; beside it the
step as training ran it before issue 26 (torch's default AdamW, the clip walking the supernet's modules for its
parameters, the loss read back every step), and the step with its operations compiled (`--torchcompile`). Target
>= 0.8 on a GPU. On a CPU (--allow-cpu) the kernels are the top-level aten operators and compiled regions: the share
of the step spent computing, not in Python.

    python bench/training_feed.py [--data imagefolder:PATH] [--cpus 12,4] [--record]
    python bench/training_feed.py --allow-cpu --batch 16 --cpus 2,1 --steps 6 --warmup 2   # on this 2-core CPU
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import Subset

from glit_ray.models.glit import compile_operations
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet
from glit_ray.synthetic import write_imagefolder
from glit_ray.training.data import Splits, build_splits
from glit_ray.training.loaders import training_loader
from glit_ray.training.loop import RecipeState
from glit_ray.training.recipe import PRESETS

from harness import publish, sync, training_device

SEED = 0
RESIDENT_BATCHES = 4  # device-resident batches the reference steps cycle through
# what computes on a CPU: aten's operators, and inductor's code in a compiled region's forward and backward
CPU_KERNELS = ("aten::", "Torch-Compiled Region", "autograd::engine::evaluate_function: CompiledFunctionBackward")
COMPILE_WARMUP = 20  # steps before a compiled step is timed: enough paths to have met every operation's shapes


class SupernetStep:
    """The supernet's training step as a Ray Train worker runs it, on a new sampled path each call. `before`: as
    training ran it before issue 26 (torch's default AdamW, the parameters walked for the clip, the loss read);
    `torchcompile`: with its operations compiled by that backend (`--torchcompile`)."""

    def __init__(self, space: SearchSpace, splits: Splits, dev: torch.device, before: bool = False,
                 torchcompile: str | None = None):
        torch.manual_seed(SEED)
        self.space, self.dev, self.before, self.rng, self.updates = space, dev, before, random.Random(SEED), 0
        self.net = GLiTSupernet(space, "high", num_classes=splits.num_classes).to(dev).train()
        if torchcompile:
            compile_operations(self.net, backend=torchcompile)
        self.recipe = RecipeState.build(self.net, PRESETS["deit"], lr=1e-3, epochs=1, steps_per_epoch=10**6, device=dev, splits=splits)
        self.params = list(self.net.parameters())
        if before:  # torch's default: a loop over the tensors on a CPU, foreach kernels on a GPU
            for group in self.recipe.optimizer.param_groups:
                group["fused"] = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        arch = self.space.sample("high", self.rng)
        images, labels = images.to(self.dev, non_blocking=True), labels.to(self.dev, non_blocking=True)
        params = self.net.parameters() if self.before else self.params
        loss = self.recipe.step([lambda x: self.net(x, arch)], params, images, labels, self.updates)
        self.updates += 1
        if self.before:
            loss.item()


def images_per_s(step: SupernetStep, batches: Iterator, steps: int, warmup: int) -> float:
    """Images/s of `steps` steps on what `batches` yields, after `warmup` untimed steps."""
    for _ in range(warmup):
        step(*next(batches))
    sync()
    started, images = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        images += len(batch[0])
        step(*batch)
    sync()
    return images / (time.perf_counter() - started)


def endless(loader) -> Iterator:
    """The loader's batches, epoch after epoch (its processes persist, as in training)."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


@contextmanager
def held_to(cpus: int):
    """This process, its torch threads and the loader processes it starts on its first `cpus` CPUs, as a Ray Train
    worker that asked for that many."""
    every, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, sorted(every)[:cpus])
        held = True
    except OSError as exc:  # a sandbox that refuses it: the loader processes and threads are still N
        held = False
        print(f"note: this process cannot be held to {cpus} CPUs ({exc}); its loader has {cpus} processes on all "
              f"{len(every)}", flush=True)
    torch.set_num_threads(cpus)
    try:
        yield
    finally:
        if held:
            os.sched_setaffinity(0, every)
        torch.set_num_threads(threads)


def busy_share(step: SupernetStep, resident: list, steps: int, warmup: int) -> tuple[float, float]:
    """(share of the wall time the device runs kernels, ms per step) over `steps` steps of a profile. On a GPU the
    wall time is that of as many steps unprofiled: the profiler's own CPU time per operator would stretch a step the
    CPU holds up, not its kernels. On a CPU the profiler stretches both alike, so the profiled steps' own."""
    cuda = step.dev.type == "cuda"
    unprofiled = steps * len(resident[0][0]) / images_per_s(step, itertools.cycle(resident), steps, warmup)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as trace:
        batches, started = itertools.cycle(resident), time.perf_counter()
        for _ in range(steps):
            step(*next(batches))
        sync()
        profiled = time.perf_counter() - started
    seconds = unprofiled if cuda else profiled
    spans = sorted((e.time_range.start, e.time_range.end) for e in trace.events()
                   if (e.device_type == DeviceType.CUDA if cuda else e.name.startswith(CPU_KERNELS)))
    busy, reach = 0.0, -math.inf  # the union of the intervals, in microseconds
    for start, end in spans:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy / 1e6 / seconds, seconds / steps * 1e3


def measure(splits: Splits, space: SearchSpace, batch: int, cpus: list[int], steps: int,
            warmup: int) -> tuple[str, str, dict[int, float]]:
    """P10's and P11's tables, and the end-to-end images/s at each CPU count."""
    dev = training_device()
    # enough training images that the timed steps of a CPU count fall in one epoch, as on ImageNet's 10,000 a worker
    repeats = math.ceil((warmup + steps) * batch / len(splits.train))
    splits = replace(splits, train=Subset(splits.train, list(range(len(splits.train))) * repeats))
    step = SupernetStep(space, splits, dev)
    with held_to(min(cpus)):
        resident = [(x.to(dev), y.to(dev)) for x, y in itertools.islice(
            training_loader(splits, batch, SEED, min(cpus), dev), RESIDENT_BATCHES)]
    feed_rows, end_to_end = [], {}
    for count in cpus:
        with held_to(count):
            fed = images_per_s(step, itertools.cycle(resident), steps, warmup)
            loader = training_loader(splits, batch, SEED, count, dev)
            end_to_end[count] = images_per_s(step, endless(loader), steps, warmup)
            del loader
        ratio = end_to_end[count] / fed
        feed_rows.append(f"| {count} | {count} | {end_to_end[count]:.0f} | {fed:.0f} | **{ratio:.2f}** |")
        print(feed_rows[-1], flush=True)
    busy_rows = []
    for name, stepper, warm in (  # today's step is P10's, already warm; the others are built when their turn comes
            ("today's: fused AdamW, parameters listed once, the loss read at the epoch's end", lambda: step, warmup),
            ("before issue 26: torch's default AdamW, parameters walked per step, the loss read per step",
             lambda: SupernetStep(space, splits, dev, before=True), warmup),
            # its warm-up compiles a graph per operation shape: 7 at the high level, each path's few at a time
            ("today's with `--torchcompile` (inductor), after its graphs are compiled",
             lambda: SupernetStep(space, splits, dev, torchcompile="inductor"), COMPILE_WARMUP)):
        share, ms = busy_share(stepper(), resident, steps, warm)
        busy_rows.append(f"| {name} | {ms:.1f} | **{share:.2f}** |")
        print(busy_rows[-1], flush=True)
    where = (f"{dev.type}" + (f" ({torch.cuda.get_device_name()}, bfloat16 autocast)" if dev.type == "cuda" else ""))
    setup = (f"{space.name} high-level supernet, batch {batch}, {space.img_size}-px images, {where}; {steps} timed steps "
             f"after {warmup}")
    p10 = "\n".join([
        f"{setup}. End to end: the training loader, one process per CPU; device-fed: {RESIDENT_BATCHES} batches "
        "on the device, cycled.", "",
        "| CPUs | loader processes | end-to-end images/s | device-fed images/s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: |", *feed_rows, "", "Target: >= 0.9 at 12 CPUs, on a GPU."])
    p11 = "\n".join([
        f"{setup}, fed from the device. Busy: the union of the "
        + ("CUDA kernels'" if dev.type == "cuda" else "aten operators' and compiled regions'")
        + " intervals in a torch.profiler trace over the steps' wall time"
        + (" unprofiled." if dev.type == "cuda" else "."), "",
        "| step | ms per step | busy share |", "| --- | ---: | ---: |", *busy_rows, "",
        "Target: >= 0.8 on a GPU."])
    return p10, p11, end_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="glit_tiny")
    parser.add_argument("--data", help="imagefolder:PATH (default: write a synthetic one under --out)")
    parser.add_argument("--out", type=Path, default=None, help="where a written folder goes (default: a temporary one)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cpus", default="12,4", help="CPU counts to hold the feed to, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("error: no CUDA GPU here; run it on a GPU machine (or add --allow-cpu to measure the CPU)")
    cpus = [int(c) for c in args.cpus.split(",")]
    if max(cpus) > len(os.sched_getaffinity(0)):
        sys.exit(f"error: --cpus {args.cpus} asks for more than this machine's {len(os.sched_getaffinity(0))} CPUs; "
                 "give fewer")
    if args.data is None:
        args.data = f"imagefolder:{write_imagefolder((args.out or Path(tempfile.mkdtemp())) / 'data', 20, 32, 2)}"
    space = SearchSpace.load(args.space)
    p10, p11, _ = measure(build_splits(args.data, space.img_size, space.in_chans), space, args.batch, cpus,
                          args.steps, args.warmup)
    publish("P10", p10, args.record)
    publish("P11", p11, args.record)


if __name__ == "__main__":
    main()
