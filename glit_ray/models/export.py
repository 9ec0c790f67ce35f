"""A trained architecture on disk: `model.safetensors` (weights), `arch.json` and `config.json` (how to build it).

`arch.json` holds the keyword arguments of `GLiT` (architecture string, the space as a mapping,
classes, image size, channels), so the pair reloads without glit_ray's run files or the space's
YAML. `config.json` says the same in timm's layout (the one `timm.models.push_to_hf_hub` writes), so
that the folder loads as any timm model does, and pushes to a hub as it is:

    model = glit_ray.load_model(RUN_DIR)
    model = glit_ray.load_model("glit_tiny.pth.tar", space="glit_tiny")  # the authors' checkpoint

    import timm, glit_ray  # importing glit_ray registers 'glit' with timm
    model = timm.create_model(f"local-dir:{RUN_DIR}", pretrained=True)

Both files' `pretrained_cfg` says how training fed the network (size, channels, interpolation, crop, the data set's
mean and std), so that timm builds the same preprocessing for either loader's model:

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_atomic, write_json
from glit_ray.models.checkpoint import fit_state_dict, read_checkpoint
from glit_ray.models.glit import GLiT, default_cfg, published_arch
from glit_ray.models.space import SearchSpace

FORMAT = "glit_ray.model/1"
WEIGHTS, ARCH, TIMM_CONFIG = "model.safetensors", "arch.json", "config.json"


def model_args(model: GLiT) -> dict:
    """The keyword arguments that rebuild `model`'s architecture (without its weights)."""
    return {"arch": str(model.arch), "space": model.space.to_dict(), "num_classes": model.num_classes,
            "img_size": model.patch_embed.img_size[0], "in_chans": model.patch_embed.proj.in_channels}


def eval_crop_pct(img_size: int) -> float:
    """The centre crop training evaluates with (`glit_ray.training.data.eval_transform`): DeiT's 0.875, but the whole
    image below 64 px, where a crop would cut the digit or the CIFAR object."""
    return 1.0 if img_size < 64 else 0.875


def preprocessing(in_chans: int, img_size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  interpolation: str = "bicubic") -> dict:
    """timm's data-config keys for the view training evaluated the network on: resized (`interpolation`), centre
    cropped to `img_size`, scaled to [0, 1] and normalised with the data set's `mean` and `std` (one value per
    channel, or one for all). Without them none are claimed and timm assumes ImageNet's."""
    config = {"input_size": [in_chans, img_size, img_size], "interpolation": interpolation,
              "crop_pct": eval_crop_pct(img_size), "crop_mode": "center"}
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = [float(v) for v in values]
        if len(values) == 1:
            values *= in_chans
        if len(values) != in_chans:
            raise UserError(f"{name} has {len(values)} values but the model takes {in_chans} channels; "
                            f"give one value per channel or one for all")
        config[name] = values
    return config


def timm_pretrained_cfg(pretrained_cfg: dict) -> dict:
    """The family's defaults overlaid with an export's `pretrained_cfg`; ImageNet's mean and std only where the
    export gives none and timm would assume them anyway."""
    return {**default_cfg(), **pretrained_cfg, "architecture": "glit"}


def export_model(model: GLiT, run_dir: Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 interpolation: str = "bicubic", **info) -> None:
    """Write RUN_DIR/model.safetensors, then RUN_DIR/arch.json (with `info`) and config.json, each atomically.

    `mean`, `std`, `interpolation`: how training normalised and resized the data set's images (see `preprocessing`),
    written into both files' pretrained_cfg."""
    args = model_args(model)
    pretrained_cfg = {"num_classes": args["num_classes"],
                      **preprocessing(args["in_chans"], args["img_size"], mean, std, interpolation)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(Path(run_dir) / WEIGHTS, save_safetensors(state, metadata={"format": FORMAT, "arch": str(model.arch)}))
    write_json(Path(run_dir) / TIMM_CONFIG, {
        "architecture": "glit", "num_classes": args["num_classes"], "num_features": model.num_features,
        "global_pool": model.global_pool, "model_args": {k: v for k, v in args.items() if k != "num_classes"},
        "pretrained_cfg": timm_pretrained_cfg(pretrained_cfg)})
    write_json(Path(run_dir) / ARCH, {"format": FORMAT, "model_args": args, "pretrained_cfg": pretrained_cfg, **info})


def load_model(path: str | Path, map_location: str = "cpu", space: SearchSpace | str | None = None,
               arch: str | None = None, ema: bool = False) -> GLiT:
    """The model in PATH, in eval mode.

    PATH is a `glit_ray.retrain` run directory (model.safetensors with arch.json), or a weight file
    with `space`: the authors' released checkpoint (DeiT's training checkpoint, their tensor names)
    or a state dict in ours. A file's architecture is `arch`, by default the published GLiT-Tiny's in
    `space`; its classes are the checkpoint's head's. `ema`: take the file's `model_ema` entry instead
    of `model`. Bad input is a UserError in one line.
    """
    path = Path(path)
    if space is None and arch is None and not path.is_file():
        return _load_export(path, map_location)
    if path.is_dir():
        raise UserError(f"{path} is a directory: a retrain run carries its own space and architecture, so give no space or arch")
    if space is None:
        raise UserError(f"{path} is a weight file: give its space (e.g. space='glit_tiny', --space glit_tiny), "
                        "or give a glit_ray.retrain run directory")
    space = space if isinstance(space, SearchSpace) else SearchSpace.load(space)
    state = read_checkpoint(path, ema)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = GLiT(arch or published_arch(space), space, num_classes)
    model.load_state_dict(fit_state_dict(state, model, str(path)))
    return model.to(map_location).eval()


def _load_export(run_dir: Path, map_location: str) -> GLiT:
    if not (run_dir / ARCH).is_file() or not (run_dir / WEIGHTS).is_file():
        raise UserError(f"{run_dir} holds no exported model ({ARCH} and {WEIGHTS}); run python -m glit_ray.retrain --out {run_dir}")
    record = read_json(run_dir / ARCH)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{run_dir / ARCH} is not a glit_ray model description (format {FORMAT} expected)")
    model = GLiT(**record["model_args"])
    cfg = timm_pretrained_cfg(record.get("pretrained_cfg", {}))
    model.pretrained_cfg = {**cfg, "input_size": tuple(cfg["input_size"])}  # as timm's loader gives it
    try:
        state = load_safetensors((run_dir / WEIGHTS).read_bytes())
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as exc:
        problem = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{run_dir / WEIGHTS} does not hold this architecture's weights ({problem}); re-export it") from None
    return model.to(map_location).eval()
