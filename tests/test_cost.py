import random

import pytest
import torch

from glit_ray.arch import Architecture
from glit_ray.cost import arch_cost, cost_range, measure
from glit_ray.model import GLIT_TINY_ARCH, GLiT


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
    cost = arch_cost(tiny, GLiT(GLIT_TINY_ARCH, tiny).arch)
    # paper: 1.4 G FLOPs, 7.2 M parameters; the authors' released model: 7,264,456 parameters
    assert 1.35e9 < cost.flops < 1.5e9
    assert cost.params == 7_264_456


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
