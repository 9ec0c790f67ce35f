import subprocess
import sys

import pytest
import timm
import torch

import glit_ray  # noqa: F401  (registers the GLiT models with timm)
from glit_ray.model import ConvModule, GLiT

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
def test_registration_needs_only_the_package_import():
    code = "import timm, glit_ray; m = timm.create_model('glit_tiny_patch16_224', num_classes=3); print(type(m).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "GLiT"


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
    """Zeroing the local (last) channels' input must not change the global heads' output."""
    model = GLiT("1:k5c2v1m4-" * 5 + "1:k5c2v1m4", micro, num_classes=10).eval()
    block = model.blocks[0]
    x = torch.randn(2, 17, 96)
    y = block.norm1(x)
    split = 32
    mixed = torch.cat([block.attn(y[..., :split]), block.conv(y[..., split:])], dim=-1)
    expected = x + mixed
    expected = expected + block.mlp(block.norm2(expected))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_drop_path_rises_linearly_and_only_acts_in_training(micro):
    model = GLiT("3:v1m4-" * 5 + "3:v1m4", micro, num_classes=10, drop_path_rate=0.5)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))


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
