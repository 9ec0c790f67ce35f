"""Latency where the model will run: the ONNX export, the preprocessing an export declares, the latency table."""
import json
import random
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

import glit_ray
from glit_ray.core.errors import UserError
from glit_ray.export import main as export_main
from glit_ray.latency_table import main as table_main
from glit_ray.models import latency_table
from glit_ray.models.export import export_model
from glit_ray.models.glit import GLiT
from glit_ray.models.latency_table import build_table, load_table, predict_ms, write_table
from glit_ray.models.onnx_export import INPUT, export_onnx, onnx_session
from glit_ray.models.space import SearchSpace
from glit_ray.training.data import build_splits, eval_transform, load_digits, normalize

pytestmark = pytest.mark.onnx  # out of the quick tier: torch.export and ONNX Runtime take seconds a test

ONNX_ATOL = 1e-4  # ONNX Runtime's logits against torch's (float32; they differ by about 2e-7)
KIND_HEADS = {"global": (3,), "mixed": (1, 2), "local": (0,)}  # glit_micro's 3 heads: G = H, 0 < G < H, G = 0
ARCH = "2:k5c2v1m4-1:k5c2v1m4-1:k5c2v1m4-3:v1m4-0:k5c2m4-1:k5c2v1m4"
# a space small enough that a whole table is timed in a second: 5 block options, depth 2
LITTLE = {"name": "little", "embed_dim": 24, "depth": 2, "num_heads": 3, "patch_size": 2, "img_size": 8, "in_chans": 1,
          "global_heads": [0, 1, 3],
          "blocks": {"local": {"kernel": [3, 5], "conv_expansion": 1, "mlp_ratio": 2},
                     "mixed": {"kernel": 3, "conv_expansion": 1, "attn_expansion": 1, "mlp_ratio": [2, 4]},
                     "global": {"attn_expansion": 1, "mlp_ratio": 2}},
          "defaults": {"local": {"kernel": 3}, "mixed": {"mlp_ratio": 2}}}


def arch_of_kind(space: SearchSpace, kind: str, seed: int = 0):
    """A random low-level architecture whose every block is of `kind`."""
    rng = random.Random(seed)
    return space.sample("low", rng, tuple(rng.choice(KIND_HEADS[kind]) for _ in range(space.depth)))


def test_onnx_runtime_gives_torchs_logits_at_any_batch_for_every_block_kind(micro, tmp_path):
    """One network with blocks of every kind (global, mixed, local: an export apiece is seconds)."""
    model = GLiT(ARCH, micro, num_classes=10).eval()
    assert {micro.kind(b.g) for b in model.arch.blocks} == set(KIND_HEADS)
    path = export_onnx(model, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # written in place, no temporary left
    session = onnx_session(path)
    assert session.get_inputs()[0].shape == ["batch", 1, 8, 8]
    assert session.get_modelmeta().custom_metadata_map["glit_ray.arch"] == str(model.arch)
    for batch in (1, 3):
        images = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {INPUT: images.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=0, atol=ONNX_ATOL)


def test_the_export_command_writes_model_onnx_into_a_retrain_run(micro, tmp_path, capsys):
    run_dir = tmp_path / "run"
    export_model(GLiT(ARCH, micro, num_classes=10).eval(), run_dir, mean=[0.3], std=[0.4])
    export_main([str(run_dir), "--onnx"])
    assert f"wrote {run_dir / 'model.onnx'}: ONNX Runtime's logits within" in capsys.readouterr().out
    session = onnx_session(run_dir / "model.onnx")
    cfg = json.loads(session.get_modelmeta().custom_metadata_map["timm.pretrained_cfg"])
    assert cfg["mean"] == [0.3] and cfg["std"] == [0.4] and cfg["input_size"] == [1, 8, 8]


def test_the_export_command_refuses_bad_input_in_one_line_writing_nothing(micro, tmp_path, cli_error, monkeypatch):
    assert "does not exist" in cli_error(export_main, [str(tmp_path / "nowhere"), "--onnx"])
    assert "holds no exported model" in cli_error(export_main, [str(tmp_path), "--onnx"])
    export_model(GLiT(ARCH, micro, num_classes=10), tmp_path / "run")
    assert "--onnx" in cli_error(export_main, [str(tmp_path / "run")])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert "pip install 'glit_ray[onnx]'" in cli_error(export_main, [str(tmp_path / "run"), "--onnx"])
    assert not list(tmp_path.rglob("*.onnx")) and not list(tmp_path.glob("nowhere"))


# ---- the preprocessing an export declares ------------------------------------------------------------------------
def digits_normalisation() -> tuple[float, float]:
    """The mean and std the digits' splits were normalised with (pixels / 16), recovered from the splits: together
    they hold every digit once, so their mean and spread against the raw pixels' give both."""
    splits = build_splits("digits", 8, 1)
    normalised = torch.cat([split.tensors[0] for split in (splits.train, splits.heldout, splits.test)])
    raw = torch.tensor(load_digits()[0], dtype=torch.float32).unsqueeze(1) / 16
    std = raw.std(correction=0) / normalised.std(correction=0)
    mean = raw.mean() - std * normalised.mean()
    torch.testing.assert_close(((raw - mean) / std).flatten().sort().values, normalised.flatten().sort().values)
    return float(mean), float(std)


def timm_transform(run_dir):
    """The eval transform timm builds for the model in `run_dir`, from either loader's model; both must agree."""
    via_timm = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    config = resolve_data_config({}, model=via_timm)
    assert resolve_data_config({}, model=glit_ray.load_model(run_dir)) == config
    return create_transform(**config), config


def test_a_digits_model_declares_the_digits_own_normalisation(micro, tmp_path):
    mean, std = digits_normalisation()
    export_model(GLiT(ARCH, micro, num_classes=10), tmp_path / "run", mean=[mean], std=[std], interpolation="bilinear")
    transform, config = timm_transform(tmp_path / "run")
    assert config["input_size"] == (1, 8, 8) and config["mean"] == [mean] and config["std"] == [std]
    digit = load_digits()[0][0].astype(np.float32)  # 0-16, as training reads it
    Image.fromarray(np.round(digit * 255 / 16).astype(np.uint8), "L").save(tmp_path / "digit.png")
    expected = (torch.tensor(digit, dtype=torch.float32)[None] / 16 - mean) / std  # training's network input
    got = transform(Image.open(tmp_path / "digit.png"))
    torch.testing.assert_close(got, expected, rtol=0, atol=0.5 / 255 / std + 1e-6)  # the PNG's 8-bit rounding


@pytest.mark.parametrize("img_size, space, photo", [(32, "glit_micro", (40, 34)), (224, "glit_pico", (300, 260))],
                         ids=["cifar-32px", "imagefolder-224px"])
def test_a_natural_image_model_declares_trainings_eval_view(img_size, space, photo, tmp_path):
    space = SearchSpace.load(space)
    model = GLiT(arch_of_kind(space, "mixed"), space, num_classes=10, img_size=img_size, in_chans=3)
    export_model(model, tmp_path / "run", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    transform, config = timm_transform(tmp_path / "run")
    assert config["input_size"] == (3, img_size, img_size)
    pixels = np.random.default_rng(0).integers(0, 256, (photo[1], photo[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    image = Image.open(tmp_path / "photo.png").convert("RGB")
    expected = normalize(eval_transform(img_size)(image)[None], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
    torch.testing.assert_close(transform(image), expected, rtol=0, atol=1e-5)


def test_a_mean_that_does_not_fit_the_channels_is_refused(micro, tmp_path):
    with pytest.raises(UserError, match="mean has 3 values but the model takes 1 channels"):
        export_model(GLiT(ARCH, micro, num_classes=10), tmp_path, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    assert not list(tmp_path.iterdir())


# ---- the latency table -------------------------------------------------------------------------------------------
@pytest.fixture
def quick_timing(monkeypatch):
    """Timings of a few repeats: these tests check the table's bookkeeping, not its figures (P14 does)."""
    monkeypatch.setattr(latency_table, "SPAN_S", 0.001)
    monkeypatch.setattr(latency_table, "MIN_REPEATS", 3)


@pytest.fixture
def little():
    return SearchSpace.from_dict(LITTLE)


def test_a_table_times_each_block_option_once_and_predicts_their_sum(little, quick_timing, tmp_path):
    table = build_table(little, "torch", threads=1, batch=2, num_classes=10, rounds=1)
    assert len(table["blocks_ms"]) == 5 == len({b for g in little.global_heads for b in little.options(g)})
    assert table["space"] == "little" and table["space_definition"] == little.to_dict()
    assert (table["img_size"], table["in_chans"], table["batch"], table["runtime"], table["threads"]) == (8, 1, 2, "torch", 1)
    assert table["device"] and all(v > 0 for v in (table["call_overhead_ms"], table["stem_ms"], table["head_ms"]))
    arch = "0:k5c1m2-1:k3c1v1m4"
    parts = table["stem_ms"] + table["head_ms"] + table["blocks_ms"]["0:k5c1m2"] + table["blocks_ms"]["1:k3c1v1m4"]
    assert predict_ms(table, little, arch) == pytest.approx(table["call_overhead_ms"] + table["joint_ms"] + parts)
    write_table(tmp_path / "table.json", table)
    assert load_table(tmp_path / "table.json", little) == table


def test_a_table_in_onnx_runtime_times_exported_parts(quick_timing):
    little = SearchSpace.from_dict({**LITTLE, "global_heads": [0, 3], "blocks": {k: LITTLE["blocks"][k] for k in ("local", "global")}})
    table = build_table(little, "onnxruntime", rounds=1)
    assert table["runtime"] == "onnxruntime" and table["runtime_version"] and len(table["blocks_ms"]) == 3
    assert predict_ms(table, little, "3:v1m2-0:k3c1m2") > table["call_overhead_ms"]


def test_the_table_command_writes_a_table_and_predicts_from_it(little, quick_timing, tmp_path, write_space, capsys):
    space_file = write_space(LITTLE)
    out = tmp_path / "tables" / "table.json"
    table_main(["--space", str(space_file), "--runtime", "torch", "--threads", "1", "--batch", "1", "--out", str(out)])
    assert f"wrote {out}: 5 block options" in capsys.readouterr().out
    table = load_table(out, little)
    table_main(["--space", str(space_file), "--table", str(out), "--predict", "3:v1m2-3:v1m2"])
    assert capsys.readouterr().out == f"{predict_ms(table, little, '3:v1m2-3:v1m2'):.3f} ms  3:v1m2-3:v1m2\n"


def test_a_table_for_another_space_or_size_or_cut_short_is_refused_in_one_line(little, quick_timing, tmp_path,
                                                                               write_space, cli_error, monkeypatch):
    space_file = write_space(LITTLE)
    path = tmp_path / "table.json"
    table = build_table(little, "torch", rounds=1)
    write_table(path, table)
    predict = ["--space", str(space_file), "--table", str(path), "--predict", "3:v1m2-3:v1m2"]
    assert "measured for space little, not for glit_micro" in cli_error(table_main, ["--space", "glit_micro", *predict[2:]])
    assert "measured at 8 px, not 16 px" in cli_error(table_main, [*predict, "--img-size", "16"])
    changed = write_space({**LITTLE, "depth": 3}, "changed.yaml")
    assert "another definition of it" in cli_error(table_main, ["--space", str(changed), *predict[2:]])
    path.write_text(path.read_text()[:200])
    assert "cut short, or not JSON" in cli_error(table_main, predict)
    assert "does not exist" in cli_error(table_main, [*predict[:3], str(tmp_path / "none.json"), *predict[4:]])
    with pytest.raises(UserError, match="measured at 8 px, not 16 px"):
        predict_ms(table, little, "3:v1m2-3:v1m2", img_size=16)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "new.json"
    error = cli_error(table_main, ["--space", str(space_file), "--runtime", "onnxruntime", "--out", str(out)])
    assert "onnxruntime is not installed" in error and "pip install 'glit_ray[onnx]'" in error
    assert "1 or more" in cli_error(table_main, ["--space", str(space_file), "--runtime", "torch", "--threads", "0",
                                                 "--out", str(out)])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["changed.yaml", "space.yaml", "table.json"]
