"""What the benchmarks share: timing, the machine's description, recording figures in BENCHMARKS.md,
a stand-in evaluator actor and a run of the search's own Tuner on it."""
from __future__ import annotations

import datetime
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from glit_ray.core.files import write_atomic
from glit_ray.search import build_parser, generation_tuner, settings_from_args
from glit_ray.searching.results import ResultsCallback, read_candidates
from glit_ray.searching.searcher import EvolutionSearcher
from glit_ray.training.loop import use_fast_gpu_kernels

SPACE = "glit_tiny"  # 4^12 high-level architectures: breeding never runs out of new children
BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_device() -> torch.device:
    """`device()`, on a GPU with the kernel settings a Ray Train worker trains under (`use_fast_gpu_kernels`)."""
    dev = device()
    if dev.type == "cuda":
        use_fast_gpu_kernels()
    return dev


def machine() -> str:
    """What the figures were measured on, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, Ray {ray.__version__}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes (the GPU synchronised around it)."""
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def paired(a: Callable[[], object], b: Callable[[], object], warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Times of `a` and `b` run side by side: `warmup` untimed rounds, then `repeats` timed ones, alternating
    which goes first so that neither always runs on a warm cache."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for i in range(repeats):
        if i % 2:
            times_b.append(timed(b))
            times_a.append(timed(a))
        else:
            times_a.append(timed(a))
            times_b.append(timed(b))
    return times_a, times_b


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """'min / median / max' of `values` (times `scale`)."""
    return " / ".join(f"{v * scale:.{digits}g}" for v in (min(values), statistics.median(values), max(values)))


def command() -> str:
    """The command line that ran this benchmark, as BENCHMARKS.md quotes it (without --record)."""
    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], BENCHMARKS.parent),
                     *(a for a in sys.argv[1:] if a != "--record")])


def publish(bench: str, body: str, record: bool) -> None:
    """Print `body`; with `record`, also replace the figures between BENCHMARKS.md's `<!-- bench ID -->`
    markers with it, stamped with the command, the machine and the date (the rest of the file is kept)."""
    print(body)
    if not record:
        return
    text = BENCHMARKS.read_text()
    start, end = f"<!-- bench {bench} -->", f"<!-- /bench {bench} -->"
    if start not in text or end not in text:
        sys.exit(f"error: BENCHMARKS.md has no {start} ... {end} section; add the two markers where {bench}'s figures go")
    stamp = (f"Measured {datetime.date.today().isoformat()} by `{command()}` (run by `make bench`) on {machine()}.")
    section = f"{start}\n{stamp}\n\n{body.strip()}\n{end}"
    write_atomic(BENCHMARKS, re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text,
                                    flags=re.S).encode())


@ray.remote
class FakeEvaluator:
    """Answers like `Evaluator.score` after `seconds` (0: at once), without computing anything."""

    def __init__(self, actor_id: int, seconds: float = 0.0):
        self.actor_id, self.seconds = actor_id, seconds

    def score(self, arch: str) -> dict:
        time.sleep(self.seconds)
        top1 = random.Random(arch).uniform(0, 100)
        return {"top1": top1, "top5": top1, "loss": 1.0, "flops": 1, "params": 1, "eval_seconds": self.seconds,
                "actor": self.actor_id, "node": "bench"}

    def stats(self) -> dict:
        return {"actor": self.actor_id, "loads": 1}


def start_fake_evaluators(count: int, seconds: float = 0.0, cpus: float = 0.45) -> list:
    actors = [FakeEvaluator.options(num_cpus=cpus).remote(i, seconds) for i in range(count)]
    ray.get([a.stats.remote() for a in actors])  # started, before any clock runs
    return actors


def run_generations(actors: list, per_generation: int, generations: int, out: Path) -> float:
    """Seconds the search's real Tuner takes for `generations` of `per_generation` candidates on `actors`.

    Its rows are in `read_candidates(out)`, each stamped when its result reached the trial.
    """
    args = build_parser().parse_args([
        "--level", "high", "--space", SPACE, "--population", str(per_generation), "--generations", str(generations),
        "--topk", str(min(20, per_generation)), "--mutations", str(per_generation // 2),
        "--crossovers", str(per_generation - per_generation // 2)])
    searcher = EvolutionSearcher(settings_from_args(args).evolution, 1000)
    tuner = generation_tuner(out, searcher, actors, [ResultsCallback(out, "high", 10, generations)], restore=False)
    started = time.perf_counter()
    tuner.fit()
    seconds = time.perf_counter() - started
    rows = read_candidates(out).num_rows
    assert rows == generations * per_generation, rows
    return seconds
