import copy
import random
from unittest import mock

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from timm.layers import Attention, Mlp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from glit_ray.core.errors import UserError
from glit_ray.models.constraints import Limits
from glit_ray.models.cost import arch_cost
from glit_ray.models.glit import ConvModule, compile_operations
from glit_ray.models.supernet import GLiTSupernet
from glit_ray.training.loop import RecipeState
from glit_ray.training.recipe import PRESETS
from glit_ray.training.supernet_loop import PathSampler

DIST = (0, 1, 2, 3, 1, 0)


def trained_supernet(space, level, steps=4, seed=0):
    """A supernet after a few SPOS steps, so weights and BatchNorm statistics are not at init."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = GLiTSupernet(space, level, DIST if level == "low" else None, num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        arch = space.sample(level, rng, DIST)
        loss = net(torch.randn(8, 1, 8, 8), arch).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, rng


@pytest.mark.parametrize("level", ["high", "low"])
def test_supernet_path_equals_extracted_subnet(micro, level):
    net, rng = trained_supernet(micro, level)
    net.eval()
    x = torch.randn(16, 1, 8, 8)
    for _ in range(5):
        arch = micro.sample(level, rng, DIST)
        subnet = net.extract(arch)
        assert not subnet.training and subnet.arch == arch
        torch.testing.assert_close(subnet(x), net(x, arch), atol=1e-5, rtol=0)


def test_grad_checkpointing_touches_the_same_path_with_the_same_gradients(micro):
    """`--grad-checkpointing` on a supernet: each block of the sampled path is recomputed in the backward pass; the
    path's gradients are those of the plain step, and no other operation gets one."""
    net, rng = trained_supernet(micro, "high")
    net.train()
    arch, x = micro.sample("high", rng), torch.randn(8, 1, 8, 8)

    def grads(checkpointing: bool) -> dict:
        net.set_grad_checkpointing(checkpointing)
        net.zero_grad(set_to_none=True)
        net(x, arch).logsumexp(-1).mean().backward()
        return {name: p.grad for name, p in net.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert recomputed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, msg=name)


def test_extracted_subnet_owns_its_weights(micro):
    net, rng = trained_supernet(micro, "high")
    arch = micro.sample("high", rng)
    subnet = net.extract(arch).eval()
    x = torch.randn(2, 1, 8, 8)
    before = subnet(x)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    torch.testing.assert_close(subnet(x), before)


@pytest.mark.parametrize("level", ["high", "low"])
def test_forward_touches_only_the_chosen_path(micro, level):
    net, rng = trained_supernet(micro, level, steps=0)
    arch = micro.sample(level, rng, DIST)
    net.zero_grad(set_to_none=True)
    net(torch.randn(4, 1, 8, 8), arch).sum().backward()
    touched = sum(p.numel() for p in net.parameters() if p.grad is not None)
    assert touched == arch_cost(micro, arch, 10).params
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(torch.zeros(1, 1, 8, 8), arch)
    assert counter.get_total_flops() // 2 == arch_cost(micro, arch, 10).flops


def test_a_training_step_moves_only_the_sampled_path(micro):
    """The DeiT step (fused AdamW with weight decay, clipping, the schedule) on a supernet updates the sampled path's
    weights and leaves every other operation's exactly as it was, those an earlier step trained included: no decay,
    no momentum without a gradient."""
    net, rng = trained_supernet(micro, "high", steps=0)
    recipe = RecipeState.build(net, PRESETS["deit"], lr=1e-3, epochs=1, steps_per_epoch=10, device=torch.device("cpu"))
    params = list(net.parameters())
    for update in range(3):
        arch, before = micro.sample("high", rng), {n: p.detach().clone() for n, p in net.named_parameters()}
        recipe.step([lambda x: net(x, arch)], params, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)), update)
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        assert sum(net.get_parameter(n).numel() for n in moved) == arch_cost(micro, arch, 10).params, arch


def test_a_fair_step_trains_every_choice_once_with_the_mean_of_its_paths_gradients(micro):
    """A fair sampler's step (FairNAS): one update of the mean loss over its paths moves every weight of the
    high-level supernet, and its gradients are the mean of each path's own."""
    net, _ = trained_supernet(micro, "high", steps=0)
    paths = PathSampler(micro, "high", None, Limits(), 10, seed=0, sampling="fair")(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    params = list(net.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for path in paths:
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(images, path), labels).backward()
        for e, p in zip(expected, params):
            e += (p.grad if p.grad is not None else 0) / len(paths)
    recipe = RecipeState.build(net, PRESETS["deit"], lr=1e-3, epochs=1, steps_per_epoch=10, device=torch.device("cpu"))
    recipe.criterion = torch.nn.CrossEntropyLoss()
    before = [p.detach().clone() for p in params]
    with mock.patch.object(torch.nn.utils, "clip_grad_norm_"):  # the gradients as the paths left them
        recipe.step([lambda x, path=path: net(x, path) for path in paths], params, images, labels, 0)
    assert all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(params, expected))
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every choice, the stem and the head moved


def test_compiled_operations_train_as_eager_with_one_graph_per_operation_shape(micro):
    """`--torchcompile` on a low-level supernet (9 convolutions a mixed block): its operations compiled one by one
    train the sampled paths as eager does, with one graph per distinct operation shape, all of them compiled (none
    left to eager past dynamo's default recompile limit of 8 a function, which timm.optim's import raises as a side
    effect) and no more, where a graph of the network would be compiled for each path. With the aot_eager backend:
    the capture is what the model's code decides; inductor's code generation (a minute on 2 cores) is torch's own."""
    eager, rng = trained_supernet(micro, "low", steps=0)
    recipes, graphs = {}, []
    with torch._dynamo.config.patch(recompile_limit=8):
        compiled = compile_operations(copy.deepcopy(eager), backend="aot_eager")
        torch._dynamo.reset()
        counters.clear()
        for net in (eager, compiled):
            recipes[net] = RecipeState.build(net, PRESETS["deit"], lr=1e-3, epochs=1, steps_per_epoch=10, device=torch.device("cpu"))
        for update in range(24):
            arch, images, labels = micro.sample("low", rng, DIST), torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
            for net, recipe in recipes.items():
                recipe.step([lambda x, net=net: net(x, arch)], list(net.parameters()), images, labels, update)
            graphs.append(counters["stats"]["unique_graphs"])
    for (name, trained), same in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(same, trained, rtol=1e-4, atol=1e-5, msg=name)
    operations = [m for m in compiled.modules() if isinstance(m, (Attention, ConvModule, Mlp))]
    shapes = {(type(m), tuple(p.shape for p in m.parameters())) for m in operations}
    assert graphs[-1] == len(shapes) == 23 and graphs[-1] > graphs[0], graphs


def test_each_operation_is_held_once(micro):
    high = GLiTSupernet(micro, "high", num_classes=10)
    block = high.blocks[0]
    assert (len(block.attn), len(block.conv), len(block.mlp)) == (3, 3, 1)  # attn per G>0, conv per L>0
    low = GLiTSupernet(micro, "low", DIST, num_classes=10)
    sizes = [(len(b.attn), len(b.conv), len(b.mlp)) for b in low.blocks]
    # local: 3 kernels x 3 expansions; mixed: 1 attn, 3 convs, 3 MLPs; global: 3 attns, 3 MLPs
    assert sizes == [(0, 9, 1), (1, 3, 3), (1, 3, 3), (3, 0, 3), (1, 3, 3), (0, 9, 1)]


def test_extract_rejects_an_architecture_of_another_level(micro):
    net, rng = trained_supernet(micro, "low", steps=0)
    with pytest.raises(ValueError, match="does not have this supernet's distribution"):
        net.extract(micro.sample("low", rng, (3,) * 6))
    high = GLiTSupernet(micro, "high", num_classes=10)
    with pytest.raises(UserError, match="not the high-level default"):
        high.extract(micro.sample("low", rng, DIST))
