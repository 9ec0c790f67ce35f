"""`python -m glit_ray.summary [SPACE ...]`: what each search space holds and what it costs.

Prints, per space, the skeleton (embedding, depth, heads, image/patch size), how many architectures
each level holds (high: G choices ^ depth; low: options per block ^ depth) and the FLOPs/params
range at the high level: the figures to pick `--flops-max`/`--params-max` from. FLOPs are in
`--flops-convention` (default macs: every multiply-accumulate; glit: the GLiT authors' formula,
the one the paper's limits are in; see `glit_ray.models.cost`).

`python -m glit_ray.summary --space S --arch ARCH` prints one architecture's parameters and its
FLOPs in both conventions.
"""
from __future__ import annotations

from rich.table import Table

from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.progress import console as make_console
from glit_ray.models.arch import Architecture
from glit_ray.models.cost import CONVENTIONS, arch_cost, cost_range
from glit_ray.models.space import SearchSpace, builtin_spaces

CONVENTION_NOTES = {
    "macs": "every multiply-accumulate (torch's flop counter / 2)",
    "glit": "the GLiT authors' formula (the paper's limits)",
}


def _fmt(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def space_table(spaces: list[SearchSpace], num_classes: int, convention: str = "macs") -> Table:
    table = Table(title=f"GLiT search spaces ({num_classes} classes)")
    for column in ("space", "skeleton", "high", "low", f"FLOPs ({convention})", "params"):
        table.add_column(column, justify="left" if column == "space" else "right")
    for space in spaces:
        low, high = cost_range(space, "high", num_classes, convention=convention)
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


def arch_table(space: SearchSpace, arch: Architecture, num_classes: int) -> Table:
    """One architecture's parameters and FLOPs in every convention."""
    table = Table(title=f"one {space.name} architecture ({num_classes} classes)")
    for column in ("", "count", "", "convention"):
        table.add_column(column, justify="left" if column in ("", "convention") else "right")
    costs = {convention: arch_cost(space, arch, num_classes, convention) for convention in CONVENTIONS}
    params = costs["macs"].params
    table.add_row("params", f"{params:,}", _fmt(params), "")
    for convention, cost in costs.items():
        table.add_row(f"FLOPs, {convention}", f"{cost.flops:,}", _fmt(cost.flops), CONVENTION_NOTES[convention])
    return table


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m glit_ray.summary", description=__doc__.splitlines()[0])
    parser.add_argument("spaces", nargs="*", help="YAML paths or built-in names (default: all built-in)")
    parser.add_argument("--space", help="a YAML path or built-in name (with --arch: the architecture's space)")
    parser.add_argument("--arch", help="an architecture string: print its params and FLOPs in both conventions")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--flops-convention", choices=CONVENTIONS, default="macs",
                        help="FLOPs of the space table: macs (every multiply-accumulate, default) or glit (the authors' formula)")
    args = parser.parse_args(argv)
    if args.arch is not None:
        if args.space is None or args.spaces:
            raise UserError("--arch needs its space as --space S and no other spaces; e.g. --space glit_tiny --arch ARCH")
        space = SearchSpace.load(args.space)
        arch = space.validate(Architecture.parse(args.arch))
        console = make_console(stderr=False)
        console.print(str(arch), soft_wrap=True, markup=False, highlight=False)
        console.print(arch_table(space, arch, args.num_classes))
        return
    names = args.spaces + ([args.space] if args.space else [])
    spaces = [SearchSpace.load(name) for name in names or builtin_spaces()]
    make_console(stderr=False).print(space_table(spaces, args.num_classes, args.flops_convention))


if __name__ == "__main__":
    run(main)
