"""Latency of a network on the device it runs on: the median of repeated forward passes.

Timed after warm-up passes (allocator, cuDNN autotuning and caches settle), synchronising the GPU
around each pass, under the same autocast a GPU evaluator uses. The figure is the device's and
the thread count's it was measured with (an evaluator actor's CPU share, or its one GPU), so runs
compare only on like evaluators; the Parquet records the device beside it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

WARMUP, REPEATS = 5, 20


@torch.inference_mode()
def measure_ms(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = WARMUP,
               repeats: int = REPEATS) -> float:
    """Median milliseconds of `forward(example)` over `repeats` passes after `warmup` untimed ones."""
    cuda = example.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(example.device)
        started = time.perf_counter()
        forward(example)
        if cuda:
            torch.cuda.synchronize(example.device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def device_name(device: torch.device) -> str:
    """'cpu (N threads)' or 'cuda: <GPU model>': what a latency figure was measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"
