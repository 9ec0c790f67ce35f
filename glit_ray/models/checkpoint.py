"""Reading weight files for a GLiT: the authors' released checkpoint and glit_ray's own exports.

The authors' checkpoint is DeiT's training checkpoint: a dict whose `model` entry is the state
dict (beside `optimizer`, `lr_scheduler`, `epoch`, `model_ema`, `scaler`, `args`), in their names
(reference, "The authors' released model and checkpoint"). `checkpoint_filter_fn` is the timm
`pretrained_filter_fn` of every registered GLiT model, so timm's usual local-file path loads it:

    timm.create_model("glit_tiny_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="glit_tiny.pth.tar"))

and `glit_ray.load_model("glit_tiny.pth.tar", space="glit_tiny")` goes through the same filter.
Checkpoints already in our names (glit_ray's exports) pass through unchanged. Either way the
filter checks every tensor against the model and refuses a checkpoint of another architecture or
space in one line naming the first tensor that does not fit.

Which entry: `model` (the weights DeiT's evaluation, hence the published top-1, uses), else
`state_dict`, else the EMA entry (`model_ema`, `state_dict_ema`), else the file is a bare state
dict. timm's own reader prefers the EMA entry when there is one, so for a torch file the filter
reads the file again and takes the entry in this order; `load_model(..., ema=True)` takes the EMA.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors_file
from timm.layers import resample_abs_pos_embed
from timm.models import clean_state_dict
from torch import nn

from glit_ray.core.errors import UserError

ENTRIES = ("model", "state_dict")
EMA_ENTRIES = ("model_ema", "state_dict_ema")

# Their per-block names (under `blocks.{i}.0.`) -> ours (under `blocks.{i}.`). Their Conformer module
# is a Sequential `net`: 0 transpose, 1 pointwise, 2 GLU, 3 depthwise (a wrapper holding `conv`),
# 4 BatchNorm1d, 5 Swish, 6 pointwise; only 1, 3, 4 and 6 hold tensors. Everything else (norm1,
# norm2, mlp.*, attn.qkv, attn.proj) keeps its name.
_THEIR_BLOCK = re.compile(r"^blocks\.(\d+)\.0\.(.+)$")
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_THEIR_CONV = {"attn.net.1.": "conv.pw1.", "attn.net.3.conv.": "conv.dw.", "attn.net.4.": "conv.bn.",
               "attn.net.6.": "conv.pw2."}


def read_checkpoint(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a weight file (safetensors, or a torch checkpoint in DeiT's or timm's layout).

    Missing, truncated or foreign files are a UserError in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give the path of a GLiT weight file (.pth, .pth.tar, .safetensors)")
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_safetensors_file(path)
        else:
            # DeiT's training checkpoint keeps its command line as an argparse.Namespace in `args`
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
                        "download or export it again") from None
    return clean_state_dict(_state_entry(checkpoint, path, ema))


def _state_entry(checkpoint, path: Path, ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint")
    order = EMA_ENTRIES if ema else ENTRIES + EMA_ENTRIES
    entry = next((name for name in order if isinstance(checkpoint.get(name), dict)), None)
    if entry is not None:
        return checkpoint[entry]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()) and not ema:
        return checkpoint
    wanted = "a 'model_ema' entry" if ema else "a 'model' or 'model_ema' entry, or a bare state dict"
    raise UserError(f"{path} holds no state dict (entries: {', '.join(map(str, list(checkpoint)[:8]))}); expected {wanted}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def _rename(key: str, block: re.Pattern, names: dict[str, str], prefix: str) -> str | None:
    """`key` with its per-block part renamed by `names` under `prefix` (index filled in); None off-pattern."""
    match = block.match(key)
    if not match:
        return None
    index, rest = match.groups()
    old = next((old for old in names if rest.startswith(old)), "")
    return prefix.format(index) + names.get(old, "") + rest[len(old):]


def ours_from_theirs(key: str) -> str | None:
    """Our name for one of the authors' tensor names, or None when `key` is not in their per-block layout."""
    return _rename(key, _THEIR_BLOCK, _THEIR_CONV, "blocks.{}.")


def theirs_from_ours(key: str) -> str:
    """The authors' name for one of our tensor names (the inverse of `ours_from_theirs`)."""
    return _rename(key, _OUR_BLOCK, {ours: theirs for theirs, ours in _THEIR_CONV.items()}, "blocks.{}.0.") or key


def is_theirs(state_dict: dict) -> bool:
    """Whether `state_dict` is in the authors' layout (each block a one-element list: `blocks.{i}.0.`)."""
    return any(_THEIR_BLOCK.match(k) for k in state_dict)


def fit_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "the checkpoint",
                   adapted: tuple[str, ...] = (), hint: str = "use the checkpoint's own space and architecture",
                   ) -> dict[str, torch.Tensor]:
    """`state_dict` in our names, checked tensor by tensor against `model`.

    The authors' names are mapped onto ours; ours pass through. The first tensor (in the checkpoint's
    order, then the model's) that is extra, missing or of another shape is a one-line UserError
    naming it, as the checkpoint calls it. `adapted`: names whose shape timm adapts after the filter
    (a classifier for other classes, a first convolution for other input channels), not checked.
    `hint`: the fix the message ends with.
    """
    theirs = is_theirs(state_dict)
    ours = {(ours_from_theirs(k) or k) if theirs else k: (k, v) for k, v in state_dict.items()}
    expected = model.state_dict()
    what = _describe(model)

    def refuse(problem: str):
        raise UserError(f"{source} is not a checkpoint of {what}: {problem}; {hint}")

    def label(name: str) -> str:  # as the checkpoint calls it (or would, for a missing one)
        original = ours[name][0] if name in ours else theirs_from_ours(name) if theirs else name
        return original if name == original else f"{original} (ours: {name})"

    for name, (_, tensor) in ours.items():
        if name in adapted:
            continue
        if name not in expected:
            refuse(f"tensor {label(name)} has no place in the model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            refuse(f"tensor {label(name)} is {_shape(tensor)} but the model's is {_shape(expected[name])}")
    for name in expected:
        if name not in ours and name not in adapted:
            refuse(f"tensor {label(name)} is missing")
    return {name: tensor for name, (_, tensor) in ours.items()}


def _describe(model: nn.Module) -> str:
    space, arch = getattr(model, "space", None), getattr(model, "arch", None)
    if space is None:
        return type(model).__name__
    return f"{space.name} {arch}" if arch is not None else f"a {space.name} {type(model).__name__}"


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def _timm_adapted(model: nn.Module, cfg: dict) -> tuple[str, ...]:
    """The tensors timm's `load_pretrained` replaces or adapts after the filter, by their names."""
    adapted = []
    if getattr(model, "num_classes", None) != cfg.get("num_classes"):
        adapted += [f"{cfg.get('classifier', 'head')}.weight", f"{cfg.get('classifier', 'head')}.bias"]
    if model.patch_embed.proj.in_channels != (cfg.get("input_size") or (3,))[0]:
        adapted.append(f"{cfg.get('first_conv', 'patch_embed.proj')}.weight")
    return tuple(adapted)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's `pretrained_filter_fn` for the GLiT models: the authors' names onto ours, checked.

    timm has already read the file, taking its EMA entry when there is one; a torch file is read
    again so that its `model` entry wins (see the module doc).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    file = cfg.get("file")
    source = str(file) if file else "the pretrained state dict"
    if file and cfg.get("state_dict") is None and cfg.get("source") != "local-dir" and not str(file).endswith(".safetensors"):
        state_dict = read_checkpoint(file)
    fitted = fit_state_dict(state_dict, model, source, _timm_adapted(model, cfg) + ("pos_embed",))
    # positions of another image size are resampled to the model's patch grid, as timm's ViT does
    fitted["pos_embed"] = resample_abs_pos_embed(fitted["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=model.num_prefix_tokens)
    return fitted
