"""`python -m glit_ray.summary [SPACE ...]`: what each search space holds and what it costs.

Prints, per space, the skeleton (embedding, depth, heads, image/patch size), how many architectures
each level holds (high: G choices ^ depth; low: options per block ^ depth) and the FLOPs/params
range at the high level: the figures to pick `--flops-max`/`--params-max` from.
"""
from __future__ import annotations

import argparse

from rich.table import Table

from .cli import run
from .cost import cost_range
from .progress import console
from .space import SearchSpace, builtin_spaces


def _fmt(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def space_table(spaces: list[SearchSpace], num_classes: int) -> Table:
    table = Table(title=f"GLiT search spaces ({num_classes} classes)")
    for column in ("space", "skeleton", "high", "low", "FLOPs (MAC)", "params"):
        table.add_column(column, justify="left" if column == "space" else "right")
    for space in spaces:
        low, high = cost_range(space, "high", num_classes)
        options = {len(space.options(g)) for g in space.global_heads}
        table.add_row(
            space.name,
            f"C{space.embed_dim} d{space.depth} H{space.num_heads} {space.img_size}/{space.patch_size}",
            f"{len(space.global_heads)}^{space.depth}",
            "/".join(map(str, sorted(options))) + f"^{space.depth}",
            f"{_fmt(low.flops)}-{_fmt(high.flops)}",
            f"{_fmt(low.params)}-{_fmt(high.params)}",
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glit_ray.summary", description=__doc__.splitlines()[0])
    parser.add_argument("spaces", nargs="*", help="YAML paths or built-in names (default: all built-in)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    spaces = [SearchSpace.load(name) for name in args.spaces or builtin_spaces()]
    console(stderr=False).print(space_table(spaces, args.num_classes))


if __name__ == "__main__":
    run(main)
