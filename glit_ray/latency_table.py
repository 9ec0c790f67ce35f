"""`python -m glit_ray.latency_table --space SPACE --out TABLE.json`: a latency table measured on this machine.

    python -m glit_ray.latency_table --space glit_pico --runtime onnxruntime --threads 1 --batch 1 --out table.json
    python -m glit_ray.latency_table --space glit_pico --table table.json --predict ARCH [ARCH ...]

The first times the stem, the head and every block option of the space in the runtime the model will run in (a few
minutes on 2 cores, most of it exporting the parts to ONNX), and writes the table; run it on the target device. The
second prints the milliseconds the table predicts for architectures (see `glit_ray.models.latency_table`).
"""
from __future__ import annotations

from pathlib import Path

from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.models.latency_table import RUNTIMES, build_table, load_table, predict_ms, write_table
from glit_ray.models.space import SearchSpace


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.latency_table", description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="a built-in space name or a YAML path")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="build a table and write it here")
    mode.add_argument("--table", type=Path, help="a table built for --space, to predict from")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="what the model will run in")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the runtime (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--img-size", type=int, help="input size in pixels (default: the space's)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the head (default 1000)")
    parser.add_argument("--predict", nargs="+", metavar="ARCH", help="with --table: architectures to predict")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    space = SearchSpace.load(args.space)
    if args.table:
        if not args.predict:
            raise UserError("--table predicts: give --predict ARCH [ARCH ...]")
        table = load_table(args.table, space, args.img_size)
        for arch in args.predict:
            print(f"{predict_ms(table, space, arch, args.img_size):.3f} ms  {arch}")
        return
    if args.predict:
        raise UserError("--predict reads a table: give --table TABLE.json instead of --out")
    table = build_table(space, args.runtime, args.threads, args.batch, args.img_size, args.classes, progress=print)
    write_table(args.out, table)
    blocks = table["blocks_ms"].values()
    print(f"wrote {args.out}: {len(table['blocks_ms'])} block options {min(blocks):.3f}-{max(blocks):.3f} ms, "
          f"stem {table['stem_ms']:.3f} ms, head {table['head_ms']:.3f} ms, call {table['call_overhead_ms']:.3f} ms "
          f"({table['runtime']}, {table['device']})")


if __name__ == "__main__":
    run(main)
