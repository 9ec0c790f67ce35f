import random

import pytest
import torch

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.cost import Cost, arch_cost, block_cost, cost_range, measure, stem_cost
from glit_ray.models.glit import GLIT_TINY_ARCH, GLiT


@pytest.mark.parametrize("level", ["high", "low"])
def test_analytic_cost_matches_torch_counters_on_micro(micro, level):
    rng = random.Random(3)
    for _ in range(6):
        arch = micro.sample(level, rng, micro.sample("high", rng).distribution)
        model = GLiT(arch, micro, num_classes=10)
        assert arch_cost(micro, arch, 10) == measure(model, (1, 8, 8)), str(arch)


def test_analytic_cost_matches_torch_counters_at_tiny_scale(tiny):
    # every low-level option of every block kind, at full 224x224 size
    rng = random.Random(0)
    arch = tiny.sample("low", rng, (0, 1, 2, 3) * 3)
    assert arch_cost(tiny, arch) == measure(GLiT(arch, tiny), (3, 224, 224))


def test_published_glit_tiny_matches_the_paper(tiny):
    arch = Architecture.parse(GLIT_TINY_ARCH)
    cost = arch_cost(tiny, arch)
    # paper: 1.4 G FLOPs, 7.2 M parameters; the authors' released model: 7,264,456 parameters
    assert cost == Cost(1_472_873_280, 7_264_456)
    # the authors' formula gives what their repository reports for it, 1.33 G
    assert arch_cost(tiny, arch, convention="glit") == Cost(1_332_470_592, 7_264_456)


# The authors' formula by hand (T = 197, C = 192, C_g = 64 G, C_l = 192 - C_g), term by term:
# qkv C_g^2 e_v 3 T, attention T^2 C_g e_v 2, projection C_g^2 e_v T, pointwise C_l^2 e_c T,
# depthwise C_l e_c k T, pointwise C_l^2 e_c T, MLP 2 r C^2 T.
GLIT_BY_HAND = [
    # G = 3, e_v 0.5, MLP 4: 10,893,312 + 7,451,328 + 3,631,104 + 58,097,664
    (Block(3, attn_expansion=0.5, mlp_ratio=4), 80_073_408),
    # G = 0, k 45, e_c 4, MLP 4: 29,048,832 + 6,808,320 + 29,048,832 + 58,097,664
    (Block(0, kernel=45, conv_expansion=4, mlp_ratio=4), 123_003_648),
    # G = 1, e_v 1, k 31, e_c 4, MLP 6: 2,420,736 + 4,967,552 + 806,912 + 12,910,592 + 3,126,784 + 12,910,592 + 87,146,496
    (Block(1, kernel=31, conv_expansion=4, attn_expansion=1, mlp_ratio=6), 124_289_664),
    # G = 2, e_v 1, k 31, e_c 1, MLP 2: 9,682,944 + 9,935,104 + 3,227,648 + 806,912 + 390,848 + 806,912 + 29,048,832
    (Block(2, kernel=31, conv_expansion=1, attn_expansion=1, mlp_ratio=2), 53_899_200),
]


@pytest.mark.parametrize("block, flops", GLIT_BY_HAND, ids=str)
def test_the_authors_formula_on_hand_computed_blocks(tiny, block, flops):
    assert block_cost(tiny, block, "glit").flops == flops
    # ours counts every multiply-accumulate: the same plus the GLU's doubled first pointwise (C_l^2 e_c T)
    local = 192 - 64 * block.g
    assert block_cost(tiny, block).flops - flops == local * local * (block.conv_expansion or 0) * 197
    assert block_cost(tiny, block).params == block_cost(tiny, block, "glit").params


def test_the_authors_formula_on_the_stem(tiny):
    # patch embedding 3 C 16^2 (224/16)^2 and head C x 1000, the same in both conventions
    assert stem_cost(tiny, 1000).flops == 3 * 192 * 16**2 * 14**2 + 192 * 1000 == 29_093_376


def test_the_convention_is_checked_and_ranges_follow_it(micro):
    with pytest.raises(UserError, match="unknown FLOPs convention 'flops'"):
        arch_cost(micro, micro.sample("high", random.Random(0)), 10, convention="flops")
    ours, theirs = cost_range(micro, "high", 10), cost_range(micro, "high", 10, convention="glit")
    assert theirs[0].flops < ours[0].flops and theirs[1].flops < ours[1].flops
    assert (theirs[0].params, theirs[1].params) == (ours[0].params, ours[1].params)


def test_cost_range_bounds_every_architecture_and_is_attained(micro):
    low, high = cost_range(micro, "high", 10)
    rng = random.Random(5)
    costs = [arch_cost(micro, micro.sample("high", rng), 10) for _ in range(200)]
    assert all(low.flops <= c.flops <= high.flops and low.params <= c.params <= high.params for c in costs)
    uniform = [Architecture((micro.default_block(g),) * micro.depth) for g in micro.global_heads]
    assert min(arch_cost(micro, a, 10).flops for a in uniform) == low.flops
    assert max(arch_cost(micro, a, 10).params for a in uniform) == high.params


def test_measure_restores_training_mode(micro):
    model = GLiT(micro.sample("high", random.Random(0)), micro, num_classes=10).train()
    measure(model, (1, 8, 8))
    assert model.training
    assert torch.is_grad_enabled()
