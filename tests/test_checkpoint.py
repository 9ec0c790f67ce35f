"""The authors' released checkpoint, built from the reference facts, loads through timm and load_model."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from glit_ray.models.export import export_model
from glit_ray.models.glit import GLIT_TINY_ARCH
from glit_ray.models.supernet import GLiTSupernet, load_supernet, save_supernet
import glit_ray
from test_model import PUBLISHED_TINY

C, H, T, CLASSES = 192, 3, 197, 1000


def their_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the authors' GLiT-Tiny state dict, in their names, shapes from the reference."""
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, T, C), "patch_embed.proj.weight": (C, 3, 16, 16),
              "patch_embed.proj.bias": (C,)}
    for i, (g, k, ec, ev, r) in enumerate(PUBLISHED_TINY):
        p, cg, cl = f"blocks.{i}.0.", C * g // H, C * (H - g) // H
        shapes.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,)})
        if g:
            a = int(ev * cg)
            shapes.update({p + "attn.qkv.weight": (3 * a, cg), p + "attn.qkv.bias": (3 * a,),
                           p + "attn.proj.weight": (cg, a), p + "attn.proj.bias": (cg,)})
        if g < H:
            e = ec * cl
            shapes.update({p + "attn.net.1.weight": (2 * e, cl, 1), p + "attn.net.1.bias": (2 * e,),
                           p + "attn.net.3.conv.weight": (e, 1, k), p + "attn.net.3.conv.bias": (e,),
                           **{p + f"attn.net.4.{n}": (e,) for n in ("weight", "bias", "running_mean", "running_var")},
                           p + "attn.net.4.num_batches_tracked": (),
                           p + "attn.net.6.weight": (cl, e, 1), p + "attn.net.6.bias": (cl,)})
        shapes.update({p + "norm2.weight": (C,), p + "norm2.bias": (C,), p + "mlp.fc1.weight": (r * C, C),
                       p + "mlp.fc1.bias": (r * C,), p + "mlp.fc2.weight": (C, r * C), p + "mlp.fc2.bias": (C,)})
    shapes.update({"norm.weight": (C,), "norm.bias": (C,), "head.weight": (CLASSES, C), "head.bias": (CLASSES,)})
    return shapes


# their name -> ours, spelled out (not computed by the code under test)
OURS = {"attn.net.1.": "conv.pw1.", "attn.net.3.conv.": "conv.dw.", "attn.net.4.": "conv.bn.", "attn.net.6.": "conv.pw2."}


def our_name(theirs: str) -> str:
    if not theirs.startswith("blocks."):
        return theirs
    _, i, zero, rest = theirs.split(".", 3)
    assert zero == "0"
    for a, b in OURS.items():
        rest = b + rest[len(a):] if rest.startswith(a) else rest
    return f"blocks.{i}.{rest}"


def their_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in their_shapes().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000 + seed)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "net.4.weight")):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=g)
    return state


def deit_checkpoint(model: dict, ema: dict | None) -> dict:
    """DeiT's training checkpoint around a state dict (what their released file holds)."""
    checkpoint = {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                  "lr_scheduler": {"base_values": [5e-4], "t_in_epochs": True}, "epoch": 299,
                  "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": argparse.Namespace(model="glit_tiny", lr=5e-4)}
    if ema is not None:
        checkpoint["model_ema"] = ema
    return checkpoint


@pytest.fixture(scope="module")
def authors(tmp_path_factory) -> tuple:
    """Their checkpoint file (distinct `model` and `model_ema`), and the two state dicts."""
    model, ema = their_state(0), their_state(1)
    path = tmp_path_factory.mktemp("authors") / "glit_tiny.pth.tar"
    torch.save(deit_checkpoint(model, ema), path)
    return path, model, ema


def reference_forward(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The published GLiT-Tiny computed from their state dict, following the reference ("Inside a block")."""
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], 1) + s["pos_embed"]
    ln = lambda y, p: F.layer_norm(y, (C,), s[p + ".weight"], s[p + ".bias"], eps=1e-6)  # noqa: E731
    for i, (g, k, ec, ev, r) in enumerate(PUBLISHED_TINY):
        p, cg = f"blocks.{i}.0.", C * g // H
        y, parts = ln(x, p + "norm1"), []
        if g:
            width = int(ev * C / H)
            qkv = F.linear(y[..., :cg], s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
            q, kk, v = qkv.reshape(len(x), T, 3, g, width).permute(2, 0, 3, 1, 4)
            attn = (q @ kk.transpose(-2, -1) * width**-0.5).softmax(-1)
            parts.append(F.linear((attn @ v).transpose(1, 2).reshape(len(x), T, g * width), s[p + "attn.proj.weight"],
                                  s[p + "attn.proj.bias"]))
        if g < H:
            n = p + "attn.net."
            z = F.glu(F.conv1d(y[..., cg:].transpose(1, 2), s[n + "1.weight"], s[n + "1.bias"]), dim=1)
            z = F.conv1d(z, s[n + "3.conv.weight"], s[n + "3.conv.bias"], padding=k // 2, groups=z.shape[1])
            z = F.batch_norm(z, s[n + "4.running_mean"], s[n + "4.running_var"], s[n + "4.weight"], s[n + "4.bias"])
            z = F.conv1d(F.silu(z), s[n + "6.weight"], s[n + "6.bias"])
            parts.append(z.transpose(1, 2))
        x = x + torch.cat(parts, -1)
        y = F.gelu(F.linear(ln(x, p + "norm2"), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    return F.linear(ln(x, "norm")[:, 0], s["head.weight"], s["head.bias"])


def assert_holds(model: torch.nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    """Every tensor of their state dict sits under our name for it, and the model holds nothing else."""
    ours = model.state_dict()
    assert set(ours) == {our_name(k) for k in theirs}
    for name, tensor in theirs.items():
        assert torch.equal(ours[our_name(name)], tensor), name


def test_the_reference_checkpoint_has_the_published_parameter_count():
    shapes = their_shapes()
    params = sum(math.prod(s) for n, s in shapes.items() if not n.endswith(("running_mean", "running_var", "batches_tracked")))
    assert params == 7_264_456


def test_timm_loads_their_checkpoint_through_its_local_file_path(authors):
    path, model_state, _ = authors
    model = timm.create_model("glit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert_holds(model, model_state)  # their `model` entry, not timm's usual pick, the EMA
    fresh = timm.create_model("glit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, reference_forward(model_state, x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, fresh(x), atol=1e-3)
        # the depthwise bias (the tensor ours lacked) moves the output
        model.blocks[1].conv.dw.bias.add_(1.0)
        assert not torch.allclose(model(x), out, atol=1e-4)


def test_load_model_reads_their_checkpoint_with_a_space(authors):
    path, model_state, ema_state = authors
    model = glit_ray.load_model(path, space="glit_tiny")
    assert not model.training and str(model.arch) == GLIT_TINY_ARCH
    assert_holds(model, model_state)
    assert_holds(glit_ray.load_model(path, space="glit_tiny", ema=True), ema_state)


@pytest.mark.parametrize("layout", ["bare", "ema_only"])
def test_a_bare_state_dict_or_an_ema_entry_loads_too(tmp_path, authors, layout):
    _, _, ema_state = authors
    path = tmp_path / "weights.pth"
    torch.save(ema_state if layout == "bare" else {"model_ema": ema_state, "epoch": 3}, path)
    assert_holds(glit_ray.load_model(path, space="glit_tiny"), ema_state)
    via_timm = timm.create_model("glit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_holds(via_timm, ema_state)


def test_timm_keeps_their_weights_under_a_new_classifier(authors):
    path, model_state, _ = authors
    model = timm.create_model("glit_tiny_patch16_224", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (10, C)
    ours = model.state_dict()
    for name, tensor in model_state.items():
        if not name.startswith("head."):
            assert torch.equal(ours[our_name(name)], tensor), name


def test_our_own_export_passes_through_the_same_filter(tmp_path, micro):
    arch = "2:k5c2v1m4-1:k5c2v1m4-0:k3c4m4-3:v1m4-0:k5c2m4-1:k5c2v1m4"
    model = glit_ray.GLiT(arch, micro, num_classes=10).eval()
    export_model(model, tmp_path)
    via_timm = timm.create_model("glit", pretrained=True, arch=arch, space=micro.to_dict(), num_classes=10, in_chans=1,
                                 img_size=8, pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"),
                                                                         num_classes=10, input_size=(1, 8, 8))).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(glit_ray.load_model(tmp_path)(x), model(x), rtol=0, atol=0)
    # a state dict in our names, given as a file with its space and architecture
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    with torch.no_grad():
        torch.testing.assert_close(glit_ray.load_model(tmp_path / "ours.pth", space=micro, arch=arch)(x), model(x))


def one_line_error(call) -> str:
    with pytest.raises(glit_ray.UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_another_architecture_is_refused_naming_the_first_tensor(authors):
    path, _, _ = authors
    other = GLIT_TINY_ARCH.replace("0:k45c4m4", "0:k31c4m4", 1)
    message = one_line_error(lambda: glit_ray.load_model(path, space="glit_tiny", arch=other))
    assert "blocks.4.0.attn.net.3.conv.weight (ours: blocks.4.conv.dw.weight) is (768, 1, 45)" in message
    assert "(768, 1, 31)" in message
    message = one_line_error(lambda: timm.create_model("glit_small_patch16_224", pretrained=True,
                                                       pretrained_cfg_overlay=dict(file=str(path))))
    assert "tensor cls_token is (1, 1, 192) but the model's is (1, 1, 384)" in message
    message = one_line_error(lambda: glit_ray.load_model(path, space="glit_micro"))
    assert "cannot hold the published GLiT-Tiny" in message


def test_a_stray_or_missing_tensor_is_named(tmp_path, authors):
    _, model_state, _ = authors
    extra = {**model_state, "blocks.3.0.attn.net.1.weight": torch.zeros(1)}
    torch.save({"model": extra}, tmp_path / "extra.pth")
    message = one_line_error(lambda: glit_ray.load_model(tmp_path / "extra.pth", space="glit_tiny"))
    assert "tensor blocks.3.0.attn.net.1.weight (ours: blocks.3.conv.pw1.weight) has no place in the model" in message
    torch.save({"model": {k: v for k, v in model_state.items() if "net.3.conv.bias" not in k}}, tmp_path / "old.pth")
    message = one_line_error(lambda: glit_ray.load_model(tmp_path / "old.pth", space="glit_tiny"))
    assert "tensor blocks.1.0.attn.net.3.conv.bias (ours: blocks.1.conv.dw.bias) is missing" in message


def test_missing_truncated_or_foreign_files_are_one_line(tmp_path, authors):
    path, _, _ = authors
    assert "does not exist" in one_line_error(lambda: glit_ray.load_model(tmp_path / "nope.pth.tar", space="glit_tiny"))
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[:100_000])
    assert "is not a readable checkpoint" in one_line_error(lambda: glit_ray.load_model(truncated, space="glit_tiny"))
    torch.save({"epoch": 3, "args": None}, tmp_path / "empty.pth")
    assert "holds no state dict" in one_line_error(lambda: glit_ray.load_model(tmp_path / "empty.pth", space="glit_tiny"))
    assert "give its space" in one_line_error(lambda: glit_ray.load_model(path))
    # as a command's console shows it: tests/test_evaluate.py (`python -m glit_ray.evaluate` on a truncated checkpoint)


def test_a_supernet_saved_without_the_depthwise_bias_is_refused_in_one_line(tmp_path, micro):
    path = tmp_path / "supernet.pt"
    save_supernet(GLiTSupernet(micro, "high", num_classes=10), path)
    record = torch.load(path, weights_only=True)
    record["state_dict"] = {k: v for k, v in record["state_dict"].items() if not k.endswith("dw.bias")}
    torch.save(record, path)
    message = one_line_error(lambda: load_supernet(path))
    assert "is not a checkpoint of a glit_micro GLiTSupernet: tensor blocks.0.conv." in message
    assert "dw.bias is missing; another glit_ray version saved it" in message
