import subprocess
import sys

import pytest

from glit_ray.core.errors import UserError
from glit_ray.models.glit import GLIT_TINY_ARCH
from glit_ray.models.space import SearchSpace, builtin_spaces
from glit_ray.summary import main as summary


def test_builtin_spaces_load():
    assert builtin_spaces() == ["glit_base", "glit_micro", "glit_pico", "glit_small", "glit_tiny"]
    for name in builtin_spaces():
        space = SearchSpace.load(name)
        assert space.name == name
        assert space == SearchSpace.from_dict(space.to_dict())


def test_tiny_space_is_the_papers(tiny):
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.patch_size, tiny.img_size) == (192, 12, 3, 16, 224)
    assert tiny.global_heads == (0, 1, 2, 3)
    assert tiny.choices["local"] == {"kernel": (17, 31, 45), "conv_expansion": (1, 2, 4), "mlp_ratio": (4,)}
    assert tiny.choices["mixed"] == {"kernel": (31,), "conv_expansion": (1, 2, 4), "attn_expansion": (1,), "mlp_ratio": (2, 4, 6)}
    assert tiny.choices["global"] == {"attn_expansion": (0.5, 1, 2), "mlp_ratio": (2, 4, 6)}
    assert tiny.size("high") == 4**12
    assert all(len(tiny.options(g)) == 9 for g in range(4))
    assert tiny.size("low", (0, 1, 2, 3) * 3) == 9**12


def test_small_and_base_scale_like_deit():
    small, base = SearchSpace.load("glit_small"), SearchSpace.load("glit_base")
    assert (small.embed_dim, small.num_heads, small.global_heads) == (384, 6, (0, 2, 4, 6))
    assert (base.embed_dim, base.num_heads, base.global_heads) == (768, 12, (0, 4, 8, 12))
    assert small.choices == base.choices == SearchSpace.load("glit_tiny").choices


def test_load_by_path_and_name_agree(micro):
    assert SearchSpace.load("search_spaces/glit_micro.yaml") == micro


@pytest.mark.parametrize(
    "edit, key, problem",
    [
        (lambda d: d.update(colour="red"), "colour", "unknown key"),
        (lambda d: d.pop("depth"), "depth", "missing"),
        (lambda d: d["blocks"]["global"].update(mlp_ratio=[]), "blocks.global.mlp_ratio", "empty choice list"),
        (lambda d: d.update(num_heads=5), "num_heads", "do not divide embed_dim 96"),
        (lambda d: d.update(global_heads=[0, 1, 4]), "global_heads", "G = 4 is outside 0..3"),
        (lambda d: d.update(global_heads=[-1, 3]), "global_heads", "G = -1 is outside 0..3"),
        (lambda d: d["blocks"]["local"].update(kernel=[4, 9]), "blocks.local.kernel", "odd integer"),
        (lambda d: d["blocks"]["local"].update(dilation=2), "blocks.local.dilation", "unknown field"),
        (lambda d: d["blocks"].update(sparse={}), "blocks.sparse", "unknown block kind"),
        (lambda d: d["blocks"].pop("mixed"), "blocks.mixed", "missing"),
        (lambda d: d["defaults"]["global"].update(mlp_ratio=5), "defaults.global.mlp_ratio", "not one of the choices"),
        (lambda d: d["defaults"]["global"].pop("mlp_ratio"), "defaults.global.mlp_ratio", "missing"),
        (lambda d: d["blocks"]["global"].update(attn_expansion=[0.3]), "blocks.global.attn_expansion", "whole number"),
        (lambda d: d.update(embed_dim=0), "embed_dim", "positive integer"),
        (lambda d: d.update(patch_size=3), "patch_size", "does not divide img_size"),
    ],
)
def test_bad_space_is_rejected_naming_file_key_and_problem(micro_dict, write_space, edit, key, problem):
    edit(micro_dict)
    path = write_space(micro_dict)
    with pytest.raises(UserError) as err:
        SearchSpace.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    assert "\n" not in message


def test_unused_kind_may_be_left_out(micro_dict, write_space):
    micro_dict["global_heads"] = [3]
    micro_dict["blocks"] = {"global": micro_dict["blocks"]["global"]}
    micro_dict["defaults"] = {"global": micro_dict["defaults"]["global"]}
    space = SearchSpace.load(write_space(micro_dict))
    assert space.size("high") == 1 and space.size("low", (3,) * space.depth) == 9**space.depth


def test_invalid_yaml_and_missing_file_are_one_line_errors(write_space):
    with pytest.raises(UserError, match="not valid YAML"):
        SearchSpace.load(write_space("name: [unclosed"))
    with pytest.raises(UserError, match="not found: give a YAML path or a built-in name"):
        SearchSpace.load("no/such/glit_micro.yaml")


@pytest.mark.subprocess
def test_cli_reports_bad_space_in_one_line_with_exit_code_2(micro_dict, write_space):
    micro_dict["num_heads"] = 5
    path = write_space(micro_dict)
    proc = subprocess.run([sys.executable, "-m", "glit_ray.summary", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: num_heads: 5 heads do not divide embed_dim 96; pick a divisor of 96"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_summary_lists_every_space(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    summary([])
    out = capsys.readouterr().out
    for name in builtin_spaces():
        assert name in out
    assert "4^12" in out and "9^6" in out


def test_cli_summary_prints_one_architecture_in_both_flops_conventions(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    summary(["--space", "glit_tiny", "--arch", GLIT_TINY_ARCH])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == GLIT_TINY_ARCH
    # the published GLiT-Tiny: 1.47 G in ours, 1.33 G in the authors' formula (what their repository reports)
    for figure in ("7,264,456", "1,472,873,280", "1.47G", "1,332,470,592", "1.33G"):
        assert figure in out
    summary(["--space", "glit_micro", "--arch", "0:k5c2m4-" * 5 + "3:v1m4", "--num-classes", "10"])
    assert "one glit_micro architecture (10 classes)" in capsys.readouterr().out
    with pytest.raises(UserError, match="--arch needs its space as --space S"):
        summary(["--arch", GLIT_TINY_ARCH])
    with pytest.raises(UserError, match="is not one of"):
        summary(["--space", "glit_tiny", "--arch", GLIT_TINY_ARCH.replace("k45", "k9", 1)])


def test_cli_summary_ranges_in_the_chosen_flops_convention(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    summary(["glit_micro", "--flops-convention", "glit"])
    assert "FLOPs (glit)" in capsys.readouterr().out
    summary(["--space", "glit_micro"])
    assert "FLOPs (macs)" in capsys.readouterr().out
    with pytest.raises(UserError, match="invalid choice: 'flops'"):
        summary(["--flops-convention", "flops"])
