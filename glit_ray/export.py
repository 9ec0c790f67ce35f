"""`python -m glit_ray.export RUN_DIR --onnx`: a retrained model as RUN_DIR/model.onnx, for ONNX Runtime.

The graph takes any batch (its first axis is symbolic) and carries the model's preprocessing (timm's
pretrained_cfg) as metadata. Before the file is reported, ONNX Runtime runs it on a random batch beside torch,
and the largest difference of their logits is printed. Needs the onnx extra: `pip install 'glit_ray[onnx]'`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.models.export import load_model
from glit_ray.models.onnx_export import INPUT, export_onnx, onnx_session, require

ONNX_FILE = "model.onnx"
CHECK_BATCH = 2


def export(run_dir: Path) -> tuple[Path, float]:
    """Write RUN_DIR/model.onnx; return its path and the largest |ONNX Runtime - torch| of its logits."""
    for name in ("onnx", "onnxscript", "onnxruntime"):  # before the model is read: a missing extra is one line
        require(name)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist; give a glit_ray.retrain run directory")
    model = load_model(run_dir)
    path = export_onnx(model, run_dir / ONNX_FILE)
    shape = (CHECK_BATCH, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(images)
    got = onnx_session(path).run(None, {INPUT: images.numpy()})[0]
    return path, float((torch.from_numpy(got) - expected).abs().max())


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a glit_ray.retrain run directory (model.safetensors, arch.json)")
    parser.add_argument("--onnx", action="store_true", help="write RUN_DIR/model.onnx (the one format so far)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.onnx:
        raise UserError("say which format to export: --onnx (writes RUN_DIR/model.onnx)")
    path, difference = export(args.run_dir)
    print(f"wrote {path}: ONNX Runtime's logits within {difference:.1e} of torch's (batch {CHECK_BATCH})")


if __name__ == "__main__":
    run(main)
