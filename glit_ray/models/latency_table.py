"""Latency on the device the model will run on, for every architecture of a space, from one table built in minutes.

Every GLiT of a space is the same stem (patch embedding, class token, positions), `depth` blocks that each map
(batch, tokens, embed_dim) to the same shape, and the same head (final norm, pooling, classifier). A block option
therefore costs the same at every position: one timing per distinct block option of the space, plus the stem and
the head, predicts any architecture as their sum (`predict_ms`), where timing each architecture would cost a
model export and a measurement apiece.

Each part is timed in the runtime, threads and batch the model will run with (ONNX Runtime on its own graph of the
part, or torch). How the sum is made to match whole networks (P14 in BENCHMARKS.md measures it):

- A graph run alone pays the runtime's fixed cost of a call (ONNX Runtime binding its input and output: some 10 us,
  a tenth of an 8-px block), which a whole network pays once: an identity graph on the blocks' input measures it,
  every entry holds its part's time without it, and a prediction adds it back once.
- A block option is timed in context, as `depth` copies of it one after another: the hand-over between blocks,
  and weights that no longer all sit in the cache, are part of a block's cost in a network.
- Parts joined in one graph cost a little more than apart (the stem's output handed to a block, the runtime's
  layout changes between them: 3 % of a 224-px network on 2 cores): whole networks of one block option repeated
  (the default block of each G) measure it, the median of their excess over their parts is the table's `joint_ms`,
  added once to a prediction.
- Every part is timed in several rounds, the parts interleaved, each round the fastest of enough repeats to span
  a fifth of a second, and the entry is the median of its rounds. The fastest call is the part's own cost: on a
  busy machine the median drifts by up to 10 % with other processes' load, the fastest by 2 %; and a load that
  comes and goes shifts all parts alike instead of the ones timed while it lasted.

The table records what it is valid for (the space's whole definition, image size, classes, batch, runtime,
threads, CPU), and a table for another space or image size is refused.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from glit_ray.core.errors import UserError
from glit_ray.core.files import write_json
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.glit import GLBlock, GLiT
from glit_ray.models.onnx_export import onnx_graph, onnx_session, require
from glit_ray.models.space import SearchSpace

FORMAT = "glit_ray.latency_table/1"
RUNTIMES = ("onnxruntime", "torch")
SPAN_S, MIN_REPEATS, MAX_REPEATS, WARMUP, ROUNDS = 0.2, 20, 5000, 5, 3
OVERHEAD, STEM, HEAD, NETWORK = "call_overhead", "stem", "head", "network of G={}"
BUILD = "python -m glit_ray.latency_table --space {space} --out TABLE.json"
ENTRIES = {"space": str, "space_digest": str, "runtime": str, "device": str, "img_size": int, "num_classes": int,
           "batch": int, "threads": int, "call_overhead_ms": float, "joint_ms": float, "stem_ms": float,
           "head_ms": float, "blocks_ms": dict}  # what a prediction, its checks and its messages read


class Stem(nn.Module):
    """A GLiT up to its first block: patch embedding, class token, positions."""

    def __init__(self, model: GLiT):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


class Head(nn.Module):
    """A GLiT after its last block: final norm, pooling, classifier."""

    def __init__(self, model: GLiT):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens))


class Identity(nn.Module):
    """The cheapest graph a runtime runs on the blocks' input: its time is the runtime's cost of a call."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + 0  # an exported graph needs a node (nn.Identity's has none)


def block_options(space: SearchSpace) -> list[Block]:
    """Every distinct block the space allows at any position, at either search level."""
    return list(dict.fromkeys(block for g in space.global_heads for block in space.options(g)))


def space_digest(space: SearchSpace) -> str:
    """A fingerprint of the space's whole definition: a table measured for it fits no other."""
    return hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def cpu_name() -> str:
    """The CPU model and the cores this process may use: what a CPU latency was measured on."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({len(os.sched_getaffinity(0))} cores)"


class Runtime:
    """One runtime with a fixed number of threads: turns a module and its example input into a forward to time."""

    def __init__(self, name: str, threads: int = 1):
        if name not in RUNTIMES:
            raise UserError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
        if threads < 1:
            raise UserError(f"threads {threads}: give 1 or more")
        if name == "onnxruntime":
            for module in ("onnx", "onnxscript", "onnxruntime"):
                require(module)
        self.name, self.threads = name, threads

    @property
    def version(self) -> str:
        return require("onnxruntime").__version__ if self.name == "onnxruntime" else torch.__version__

    def forward(self, module: nn.Module, example: torch.Tensor) -> Callable[[], object]:
        """A call of `module` on `example` in this runtime (for ONNX Runtime: its graph exported, a session opened)."""
        if self.name == "torch":
            module.eval()
            return lambda: module(example)
        session, feed = onnx_session(onnx_graph(module, example), self.threads), {"input": example.numpy()}
        return lambda: session.run(None, feed)

    @contextmanager
    def pinned(self):
        """torch's threads set to this runtime's while forwards are timed (an ONNX Runtime session holds its own)."""
        threads = torch.get_num_threads()
        if self.name == "torch":
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(threads)


def timed_ms(forward: Callable[[], object]) -> float:
    """The fastest of enough calls of `forward()` to span about SPAN_S seconds (MIN_REPEATS at least), in ms."""
    for _ in range(WARMUP):
        forward()
    fastest, spent, repeats = math.inf, 0.0, 0
    while repeats < MIN_REPEATS or (spent < SPAN_S and repeats < MAX_REPEATS):
        started = time.perf_counter()
        forward()
        took = time.perf_counter() - started
        fastest, spent, repeats = min(fastest, took), spent + took, repeats + 1
    return 1e3 * fastest


def time_rounds(runtime: Runtime, forwards: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Each forward's milliseconds: the median of `rounds` rounds, each timing every forward once, in turn."""
    times: dict[str, list[float]] = {key: [] for key in forwards}
    with runtime.pinned():
        for _ in range(rounds):
            for key, forward in forwards.items():
                times[key].append(timed_ms(forward))
    return {key: statistics.median(values) for key, values in times.items()}


def part_forwards(space: SearchSpace, runtime: Runtime, batch: int = 1, img_size: int | None = None,
                  num_classes: int = 1000, progress: Callable[[str], None] | None = None) -> dict[str, Callable]:
    """The forwards a table times: the runtime's call overhead, the stem, the head, per block option `depth` copies
    of it in sequence (keyed by the block's string), and a whole network of each G's default block (what joining the
    parts costs). Building them (ONNX export) is most of a table's time."""
    if batch < 1:
        raise UserError(f"batch {batch}: give 1 or more")
    img_size = img_size or space.img_size
    if img_size % space.patch_size:
        raise UserError(f"image size {img_size} is not a multiple of space {space.name}'s patch size {space.patch_size}")
    torch.manual_seed(0)
    shell = GLiT(Architecture((space.default_block(space.global_heads[0]),) * space.depth), space, num_classes,
                 img_size=img_size).eval()
    shell.blocks = nn.Sequential()  # the stem and the head without the blocks
    images = torch.randn(batch, space.in_chans, img_size, img_size)
    tokens = torch.randn(batch, (img_size // space.patch_size) ** 2 + 1, space.embed_dim)
    forwards = {OVERHEAD: runtime.forward(Identity(), tokens), STEM: runtime.forward(Stem(shell), images),
                HEAD: runtime.forward(Head(shell), tokens)}
    for g in space.global_heads:
        arch = Architecture((space.default_block(g),) * space.depth)
        forwards[NETWORK.format(g)] = runtime.forward(GLiT(arch, space, num_classes, img_size=img_size), images)
    options = block_options(space)
    say = progress or (lambda _: None)
    for i, block in enumerate(options, 1):
        in_sequence = nn.Sequential(*(GLBlock.build(space, block) for _ in range(space.depth)))
        forwards[str(block)] = runtime.forward(in_sequence, tokens)
        if i % 10 == 0 or i == len(options):
            say(f"  {i}/{len(options)} block options built")
    return forwards


def assemble_table(space: SearchSpace, runtime: Runtime, parts_ms: dict[str, float], batch: int = 1,
                   img_size: int | None = None, num_classes: int = 1000) -> dict:
    """The table (a JSON-able dict) from the timed parts of `part_forwards`: each entry without the call overhead,
    a block's per copy."""
    overhead = parts_ms[OVERHEAD]
    blocks_ms = {str(block): (parts_ms[str(block)] - overhead) / space.depth for block in block_options(space)}
    parts = parts_ms[STEM] + parts_ms[HEAD] - overhead
    joint_ms = statistics.median(parts_ms[NETWORK.format(g)] - parts - space.depth * blocks_ms[str(space.default_block(g))]
                                 for g in space.global_heads)
    return {
        "format": FORMAT, "space": space.name, "space_digest": space_digest(space), "space_definition": space.to_dict(),
        "img_size": img_size or space.img_size, "in_chans": space.in_chans, "num_classes": num_classes,
        "batch": batch, "runtime": runtime.name, "runtime_version": runtime.version, "threads": runtime.threads,
        "device": cpu_name(), "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "call_overhead_ms": overhead, "joint_ms": joint_ms, "stem_ms": parts_ms[STEM] - overhead,
        "head_ms": parts_ms[HEAD] - overhead, "blocks_ms": blocks_ms,
    }


def build_table(space: SearchSpace, runtime: str = "onnxruntime", threads: int = 1, batch: int = 1,
                img_size: int | None = None, num_classes: int = 1000, rounds: int = ROUNDS,
                progress: Callable[[str], None] | None = None) -> dict:
    """Time the stem, the head and every block option of `space` in `runtime`; the table as a JSON-able dict."""
    timer = Runtime(runtime, threads)
    say = progress or (lambda _: None)
    say(f"building the stem, the head and {len(block_options(space))} block options of {space.name} for {runtime} "
        f"({threads} thread{'s' * (threads > 1)}, batch {batch}, {img_size or space.img_size} px)")
    forwards = part_forwards(space, timer, batch, img_size, num_classes, progress)
    say(f"timing them in {rounds} rounds")
    return assemble_table(space, timer, time_rounds(timer, forwards, rounds), batch, img_size, num_classes)


def write_table(path: str | Path, table: dict) -> None:
    write_json(Path(path), table)


def load_table(path: str | Path, space: SearchSpace, img_size: int | None = None) -> dict:
    """The table in `path`, checked to be one for `space` at `img_size` (default: the space's)."""
    path = Path(path)
    build = BUILD.format(space=space.name)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"latency table {path} does not exist; build one with {build}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable latency table ({type(exc).__name__}: cut short, or not JSON); "
                        f"rebuild it with {build}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise UserError(f"{path} is not a glit_ray latency table (format {FORMAT} expected); build one with {build}")
    missing = [key for key, kind in ENTRIES.items()
               if not isinstance(table.get(key), (int, float) if kind is float else kind)]
    if missing:
        raise UserError(f"latency table {path} lacks {missing[0]} (edited, or written in part); rebuild it with {build}")
    table = check_table(table, space, img_size, str(path))
    absent = [str(block) for block in block_options(space) if str(block) not in table["blocks_ms"]]
    if absent:
        raise UserError(f"latency table {path} has no entry for {len(absent)} block option(s) of {space.name} "
                        f"({absent[0]}, ...); rebuild it with {build}")
    return table


def check_table(table: dict, space: SearchSpace, img_size: int | None = None, source: str = "the latency table") -> dict:
    """`table`, if it was measured for `space` (its whole definition) at `img_size`; else one line saying why not."""
    img_size = img_size or space.img_size
    build = BUILD.format(space=space.name)
    if table["space_digest"] != space_digest(space):
        other = "another definition of it" if table["space"] == space.name else f"space {table['space']}"
        raise UserError(f"{source} was measured for {other}, not for {space.name}; build one with {build}")
    if table["img_size"] != img_size:
        raise UserError(f"{source} was measured at {table['img_size']} px, not {img_size} px; "
                        f"build one with {build} --img-size {img_size}")
    return table


def predict_ms(table: dict, space: SearchSpace, arch: Architecture | str, img_size: int | None = None) -> float:
    """The predicted milliseconds of a forward pass of `arch` at the table's batch, runtime and threads: the stem,
    its blocks' entries, the head, the cost of joining them and the runtime's cost of one call."""
    check_table(table, space, img_size)
    return summed_ms(table, space.validate(Architecture.parse(arch) if isinstance(arch, str) else arch).blocks)


def summed_ms(table: dict, blocks) -> float:
    """The parts every network pays once, plus the entries of `blocks`."""
    return (table["call_overhead_ms"] + table["joint_ms"] + table["stem_ms"] + table["head_ms"]
            + sum(table["blocks_ms"][str(block)] for block in blocks))


@dataclass(frozen=True)
class TableLatency:
    """A search's latency predicted from a table built on the target device (`--latency-table`), and its limit
    (`--latency-max-ms`): known before a candidate is scored, so one over the limit is never bred (the FLOPs limits'
    way), where latency measured by the evaluators costs their time and is known only after."""
    table: dict = field(repr=False, hash=False)  # checked to fit the search's space and image size when loaded
    max_ms: float | None = None
    path: str = ""  # where the table was read from: what messages name

    def __post_init__(self):
        if self.max_ms is not None and self.max_ms <= 0:
            raise UserError(f"--latency-max-ms {self.max_ms:g} is not a positive time; give milliseconds above 0")

    @classmethod
    def load(cls, path: str | Path, space: SearchSpace, max_ms: float | None = None) -> TableLatency:
        return cls(load_table(path, space), max_ms, str(Path(path).resolve()))

    @property
    def about(self) -> str:
        """What the table's milliseconds are: its runtime, threads, batch and device."""
        t = self.table
        return f"{t['runtime']}, {t['threads']} thread{'s' * (t['threads'] > 1)}, batch {t['batch']}, {t['device']}"

    def ms(self, arch: Architecture) -> float:
        return summed_ms(self.table, arch.blocks)

    def admits(self, ms: float) -> bool:
        return self.max_ms is None or ms <= self.max_ms

    def allows(self, arch: Architecture) -> bool:
        """Whether `arch`'s predicted latency is inside the limit."""
        return self.admits(self.ms(arch))

    def check_fits(self, space: SearchSpace, level: str, num_classes: int,
                   distribution: tuple[int, ...] | None = None) -> None:
        """Refuse a table whose head has another number of classes than the data, or a limit that no architecture
        of the level meets (the fastest takes the fastest option at every position)."""
        build = BUILD.format(space=space.name)
        if self.table["num_classes"] != num_classes:
            raise UserError(f"latency table {self.path} was measured with a head of {self.table['num_classes']} "
                            f"classes, the data has {num_classes}; build one with {build} --classes {num_classes}")
        if self.max_ms is None:
            return
        blocks = self.table["blocks_ms"]
        fastest = summed_ms(self.table, []) + sum(min(blocks[str(b)] for b in allowed)
                                                  for allowed in space.block_choices(level, distribution))
        if fastest > self.max_ms:
            raise UserError(f"no architecture of {space.name} ({level} level) meets --latency-max-ms {self.max_ms:g}: "
                            f"the fastest takes {fastest:.3g} ms by {self.path} ({self.about}); raise the limit")
