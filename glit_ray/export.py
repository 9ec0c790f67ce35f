"""A trained architecture on disk: `model.safetensors` (weights) and `arch.json` (how to build it).

`arch.json` holds the keyword arguments of `GLiT` (architecture string, the space as a mapping,
classes, image size, channels), so the pair reloads without glit_ray's run files or the space's
YAML, in one call either way:

    model = glit_ray.load_model(RUN_DIR)

    import json, timm, glit_ray  # importing glit_ray registers 'glit' with timm
    spec = json.load(open(f"{RUN_DIR}/arch.json"))
    model = timm.create_model("glit", pretrained=True, **spec["model_args"], pretrained_cfg_overlay=dict(
        file=f"{RUN_DIR}/model.safetensors", **spec["pretrained_cfg"]))
"""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import UserError
from .model import GLiT
from .runs import read_json, write_atomic, write_json

FORMAT = "glit_ray.model/1"
WEIGHTS, ARCH = "model.safetensors", "arch.json"


def model_args(model: GLiT) -> dict:
    """The keyword arguments that rebuild `model`'s architecture (without its weights)."""
    return {"arch": str(model.arch), "space": model.space.to_dict(), "num_classes": model.num_classes,
            "img_size": model.patch_embed.img_size[0], "in_chans": model.patch_embed.proj.in_channels}


def export_model(model: GLiT, run_dir: Path, **info) -> None:
    """Write RUN_DIR/model.safetensors, then RUN_DIR/arch.json (with `info`), each atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(Path(run_dir) / WEIGHTS, save_safetensors(state, metadata={"format": FORMAT, "arch": str(model.arch)}))
    args = model_args(model)
    pretrained_cfg = {"num_classes": args["num_classes"], "input_size": [args["in_chans"], args["img_size"], args["img_size"]]}
    write_json(Path(run_dir) / ARCH, {"format": FORMAT, "model_args": args, "pretrained_cfg": pretrained_cfg, **info})


def load_model(run_dir: str | Path, map_location: str = "cpu") -> GLiT:
    """The exported model of RUN_DIR (a `glit_ray.retrain` run), in eval mode."""
    run_dir = Path(run_dir)
    if not (run_dir / ARCH).is_file() or not (run_dir / WEIGHTS).is_file():
        raise UserError(f"{run_dir} holds no exported model ({ARCH} and {WEIGHTS}); run python -m glit_ray.retrain --out {run_dir}")
    record = read_json(run_dir / ARCH)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{run_dir / ARCH} is not a glit_ray model description (format {FORMAT} expected)")
    model = GLiT(**record["model_args"])
    try:
        state = load_safetensors((run_dir / WEIGHTS).read_bytes())
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as exc:
        problem = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{run_dir / WEIGHTS} does not hold this architecture's weights ({problem}); re-export it") from None
    return model.to(map_location).eval()
