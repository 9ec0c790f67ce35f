import subprocess
import sys

import pytest
import timm
import torch

from glit_ray.models.glit import ConvModule, GLiT
import glit_ray  # noqa: F401  (registers the GLiT models with timm)

# The reference table of the published GLiT-Tiny: (G, kernel, conv expansion, attention expansion, MLP ratio).
PUBLISHED_TINY = [
    (3, None, None, 0.5, 4), (0, 31, 2, None, 4), (1, 31, 4, 1, 6), (3, None, None, 1, 4),
    (0, 45, 4, None, 4), (1, 31, 4, 1, 6), (3, None, None, 1, 2), (1, 31, 4, 1, 2),
    (0, 45, 4, None, 4), (3, None, None, 1, 4), (0, 31, 4, None, 4), (3, None, None, 2, 6),
]


def test_timm_registry_lists_and_builds_glit():
    assert {"glit_tiny_patch16_224", "glit_small_patch16_224", "glit_base_patch16_224"} <= set(timm.list_models("glit*"))
    model = timm.create_model("glit_tiny_patch16_224", num_classes=7)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"


@pytest.mark.subprocess
def test_registration_needs_only_the_package_import_which_imports_no_ray_and_nothing_downloads():
    """In a fresh process with no network: the package import registers the models, and a timm user who wants one
    pays for neither Ray nor its data stack; the shipped digits then build without scikit-learn (1.2 s of CPU in
    every Ray worker that builds the splits)."""
    code = ("import socket, sys; socket.socket.connect = None\n"
            "import timm, glit_ray; m = timm.create_model('glit_tiny_patch16_224', num_classes=3)\n"
            "print(type(m).__name__, sorted({name.split('.')[0] for name in sys.modules} & {'ray', 'pyarrow', 'pandas'}))\n"
            "from glit_ray.training.data import build_splits; build_splits('digits', 8, 1)\n"
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["GLiT []", "False"]


def test_published_tiny_blocks_match_the_reference_table():
    model = timm.create_model("glit_tiny_patch16_224")
    C, H = 192, 3
    for block, (g, kernel, ec, ev, mlp) in zip(model.blocks, PUBLISHED_TINY, strict=True):
        if g == 0:
            assert block.attn is None
        else:
            assert block.attn.num_heads == g and block.attn.head_dim == int(ev * C / H)
            assert block.attn.qkv.in_features == C * g // H and block.attn.proj.out_features == C * g // H
            assert block.attn.qkv.bias is not None
        if g == H:
            assert block.conv is None
        else:
            local = C * (H - g) // H
            assert isinstance(block.conv, ConvModule)
            assert block.conv.pw1.in_channels == local and block.conv.pw1.out_channels == 2 * ec * local
            assert block.conv.dw.kernel_size == (kernel,) and block.conv.dw.groups == ec * local
            assert block.conv.dw.bias is not None  # as the authors' (reference: their depthwise conv has a bias)
            assert block.conv.pw2.out_channels == local
        assert block.mlp.fc1.out_features == mlp * C
        assert isinstance(block.mlp.act, torch.nn.GELU)
        assert block.norm1.eps == 1e-6


def test_published_tiny_has_the_authors_parameter_count():
    model = timm.create_model("glit_tiny_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == 7_264_456  # reference: with the depthwise bias


@pytest.mark.parametrize("name, heads, factor", [("glit_small_patch16_224", 6, 2), ("glit_base_patch16_224", 12, 4)])
def test_small_and_base_scale_the_head_split(name, heads, factor):
    model = timm.create_model(name, num_classes=0)
    assert model.space.num_heads == heads
    assert model.arch.distribution == tuple(g * factor for g, *_ in PUBLISHED_TINY)


def test_global_heads_take_the_first_channels(micro):
    """The global heads see only the first C*G/H normed channels and fill the first C*G/H of the block's output; the
    local heads the rest: changing one group's input leaves the other group's output as it was."""
    model = GLiT("1:k5c2v1m4-" * 5 + "1:k5c2v1m4", micro, num_classes=10).eval()
    block = model.blocks[0]
    split = 96 * 1 // 3  # C*G/H
    assert block.split == split and block.attn.qkv.in_features == split
    block.norm1 = torch.nn.Identity()  # LayerNorm would spread a change of any channel to all of them
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()  # the MLP mixes all channels: without it, block(x) - x is the heads' output
        block.mlp.fc2.bias.zero_()
    seen = {}
    block.attn.register_forward_hook(lambda module, args, out: seen.update(attn_in=args[0], attn_out=out))
    torch.manual_seed(0)
    x = torch.randn(2, 17, 96)
    with torch.no_grad():
        heads = block(x) - x
        torch.testing.assert_close(seen["attn_in"], x[..., :split], rtol=0, atol=0)
        torch.testing.assert_close(heads[..., :split], seen["attn_out"])  # (x + a) - x: a, to rounding
        local_changed, global_changed = x.clone(), x.clone()
        local_changed[..., split:] += torch.randn(2, 17, 96 - split)
        global_changed[..., :split] += torch.randn(2, 17, split)
        after_local, after_global = block(local_changed) - local_changed, block(global_changed) - global_changed
    torch.testing.assert_close(after_local[..., :split], heads[..., :split], rtol=0, atol=0)
    assert not torch.allclose(after_local[..., split:], heads[..., split:])
    torch.testing.assert_close(after_global[..., split:], heads[..., split:], rtol=0, atol=0)
    assert not torch.allclose(after_global[..., :split], heads[..., :split])


def test_drop_path_rises_linearly_and_only_acts_in_training(micro):
    """In training a block drops whole samples' residual branches (with rate 0.5 some samples leave the last block
    as they came in) and every pass draws anew; in evaluation the rates change nothing."""
    torch.manual_seed(0)
    model = GLiT("3:v1m4-" * 5 + "3:v1m4", micro, num_classes=10, drop_path_rate=0.5)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    without = GLiT("3:v1m4-" * 5 + "3:v1m4", micro, num_classes=10)
    without.load_state_dict(model.state_dict())
    x, tokens = torch.randn(16, 1, 8, 8), torch.randn(64, 17, 96)
    with torch.no_grad():
        model.eval(), without.eval()
        torch.testing.assert_close(model(x), without(x), rtol=0, atol=0)
        assert not (model.blocks[-1](tokens) == tokens).all(dim=(1, 2)).any()
        model.train(), without.train()
        torch.testing.assert_close(without(x), without(x), rtol=0, atol=0)  # nothing else random in training
        first, second = model(x), model(x)
        assert not torch.allclose(first, second) and not torch.allclose(first, without(x))
        untouched = (model.blocks[-1](tokens) == tokens).all(dim=(1, 2))
    assert 0 < untouched.sum() < len(tokens)  # both branches dropped for about a quarter of the samples


def test_model_trains_on_cpu(micro):
    torch.manual_seed(0)
    model = GLiT("0:k5c2m4-1:k5c2v1m4-2:k5c2v1m4-3:v1m4-0:k5c2m4-3:v1m4", micro, num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# timm's model contract for its ViT family (tests/test_models.py of pytorch-image-models), asserted here on GLiT-Tiny.
def test_default_cfg_contract_as_timm_checks_its_vits():
    model = timm.create_model("glit_tiny_patch16_224").eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(images)  # normed tokens, unpooled
        assert features.shape == (2, 197, 192)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size) == (2, 192)
        torch.testing.assert_close(model.forward_head(features), model(images))
        model.reset_classifier(0)
        assert model(images).shape == (2, model.num_features)
        model.reset_classifier(0, "")  # no pooling: every token
        assert model(images).shape == (2, 197, 192)
        model.reset_classifier(5, "avg")
        assert model(images).shape == (2, 5) and model.global_pool == "avg"
    state = model.state_dict()
    assert f"{model.pretrained_cfg['classifier']}.weight" in state and f"{model.pretrained_cfg['first_conv']}.weight" in state
    assert timm.create_model("glit_tiny_patch16_224", global_pool="", num_classes=0)(images).shape == (2, 197, 192)
    with pytest.raises(glit_ray.UserError, match="global_pool 'max' is not one of"):
        timm.create_model("glit_tiny_patch16_224", global_pool="max")


def test_other_input_sizes_as_timm_vits_take_them(tmp_path):
    """Local heads convolve along the token sequence, so only the positions depend on the size: resampled at
    creation from a checkpoint of another size, or per input with dynamic_img_size."""
    model = timm.create_model("glit_tiny_patch16_224", dynamic_img_size=True, num_classes=42).train()
    outputs = model(torch.randn(2, 3, 128, 160))
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    assert all(p.grad is not None for p in model.parameters())  # every parameter learns at 128 x 160
    trained = timm.create_model("glit_tiny_patch16_224").eval()
    torch.save(trained.state_dict(), tmp_path / "tiny224.pth")
    smaller = timm.create_model("glit_tiny_patch16_224", img_size=160, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "tiny224.pth"))).eval()
    assert smaller.pos_embed.shape == (1, 101, 192)  # 10 x 10 patches + the class token
    torch.testing.assert_close(smaller.blocks[3].mlp.fc1.weight, trained.blocks[3].mlp.fc1.weight)
    with torch.no_grad():
        assert smaller(torch.randn(1, 3, 160, 160)).shape == (1, 1000)
    with pytest.raises(AssertionError, match="Input height \\(128\\) doesn't match model \\(224\\)"):
        trained(torch.randn(1, 3, 128, 128))  # without either, as timm's ViT


def test_intermediates_and_features_only():
    model = timm.create_model("glit_tiny_patch16_224").eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images, indices=[0, 5, 11])
        torch.testing.assert_close(final, model.forward_features(images))
        assert [tuple(y.shape) for y in intermediates] == [(2, 192, 14, 14)] * 3
        tokens = model.forward_intermediates(images, indices=2, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        assert [(tuple(y.shape), tuple(c.shape)) for y, c in tokens] == [((2, 196, 192), (2, 1, 192))] * 2
        torch.testing.assert_close(tokens[-1][0], intermediates[-1].flatten(2).transpose(1, 2))
    features = timm.create_model("glit_tiny_patch16_224", features_only=True).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # the same weights (its norm and head pruned)
    assert features.feature_info.channels() == [192] * 3 and features.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        maps = features(images)
    assert len(maps) == 3 and all(m.shape == (2, 192, 14, 14) for m in maps)
    torch.testing.assert_close(maps[-1], intermediates[-1])  # the last block's grid, as forward_intermediates gives
    picked = timm.create_model("glit_tiny_patch16_224", features_only=True, out_indices=(1, 4))
    assert len(picked.model.blocks) == 5  # the blocks after the last index asked for are pruned
    with pytest.raises(AssertionError, match="feature index 12 is out of range \\(0 to 11\\)"):
        timm.create_model("glit_tiny_patch16_224", features_only=True, out_indices=(12,))


def test_grad_checkpointing_recomputes_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("glit_tiny_patch16_224", num_classes=10).train()
    images = torch.randn(2, 3, 224, 224)

    def grads(checkpointing: bool) -> dict:
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        model(images).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    assert model.grad_checkpointing
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)


def test_an_exported_model_loads_as_any_timm_model_from_its_folder(micro, tmp_path):
    from glit_ray.models.export import export_model

    model = GLiT("2:k5c2v1m4-1:k5c2v1m4-1:k5c2v1m4-3:v1m4-0:k5c2m4-1:k5c2v1m4", micro, num_classes=10).eval()
    export_model(model, tmp_path / "run")
    via_timm = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(via_timm(images), glit_ray.load_model(tmp_path / "run")(images), rtol=0, atol=0)
        torch.testing.assert_close(via_timm(images), model(images), rtol=0, atol=0)
    assert via_timm.pretrained_cfg["source"] == "local-dir" and via_timm.num_classes == 10
    # another architecture's weights in the folder: one line naming the first tensor that does not fit
    other = GLiT("3:v1m4-" * 5 + "3:v1m4", micro, num_classes=10)
    (tmp_path / "run" / "model.safetensors").unlink()
    export_model(other, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(tmp_path / "run" / "model.safetensors")
    refused = r"run is not a checkpoint of glit_micro 2:k5c2v1m4.*: tensor blocks\.0\.attn\.\S+ is \(96\)"
    with pytest.raises(glit_ray.UserError, match=refused):
        timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)


def test_an_extracted_model_exports_and_compiles_to_what_eager_gives(micro):
    """torch.export's program and torch.compile's whole graph (one graph, no break: `fullgraph`) of a subnet the
    supernet hands out. Compiled with the aot_eager backend: the capture is what the model's code decides;
    inductor's C++ code generation (about a minute on 2 cores) is torch's own."""
    import random

    from glit_ray.models.supernet import GLiTSupernet

    torch.manual_seed(0)
    model = GLiTSupernet(micro, "high", num_classes=10).extract(micro.sample("high", random.Random(3))).eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        eager = model(images)
        exported = torch.export.export(model, (images,)).module()(images)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_fx_traces_the_model_as_timm_feature_extraction_does():
    from timm.models._features_fx import create_feature_extractor

    model = timm.create_model("glit_tiny_patch16_224").eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        eager = model(images)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), eager, rtol=0, atol=0)
        nodes = create_feature_extractor(model, return_nodes={"blocks.5": "middle", "head": "logits"})(images)
    assert nodes["middle"].shape == (1, 197, 192)
    torch.testing.assert_close(nodes["logits"], eager, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # timm's test scripts it still
def test_torchscript_scripts_the_model_and_its_fx_graph_as_timm_tests_them():
    """timm's torchscript and FX + torchscript tests, with outputs checked against eager. The published Tiny holds
    all three kinds of block (global heads only, local only, both), so each branch of a GL-block is scripted."""
    from timm.models._features_fx import create_feature_extractor

    model = timm.create_model("glit_tiny_patch16_224").eval()
    assert {(b.attn is None, b.conv is None) for b in model.blocks} == {(True, False), (False, True), (False, False)}
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model(images)
        torch.testing.assert_close(torch.jit.script(model)(images), eager, rtol=1e-5, atol=1e-5)
        graph = create_feature_extractor(model, return_nodes={"blocks.5": "middle", "head": "logits"})
        scripted = torch.jit.script(graph)(images)
    torch.testing.assert_close(scripted["logits"], eager, rtol=1e-5, atol=1e-5)
    assert scripted["middle"].shape == (2, 197, 192)
