import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glit_ray.cluster.placement import Placement
from glit_ray.core.cli import run
from glit_ray.evaluate import main as evaluate_main
from glit_ray.models.arch import Architecture
from glit_ray.models.export import export_model
from glit_ray.models.scoring import evaluate
from glit_ray.models.supernet import load_supernet
from glit_ray.retrain import build_parser, main, retrain, settings_from_args
from glit_ray.training.data import build_splits, eval_batches
from glit_ray.training.imagesets import score_on, scoring_sets, scoring_sizes
from glit_ray.training.retrain_loop import inherited_model
import glit_ray
from test_train_supernet import kill_when

# in the micro space's high level (sizes at their defaults), so a high-level supernet holds it
ARCH = "2:k5c2v1m4-1:k5c2v1m4-1:k5c2v1m4-3:v1m4-0:k5c2m4-1:k5c2v1m4"
TWO_EPOCHS = ["--arch", ARCH, "--epochs", "2", "--batch-size", "64"]


def settings_for(*argv):
    return settings_from_args(build_parser().parse_args([*argv, "--out", "unused"]))


@pytest.fixture(scope="module")
def from_supernet(untrained_supernet) -> list[str]:
    """The command line of the module's retrain: ARCH for two epochs, starting from a supernet's weights."""
    return [*TWO_EPOCHS, "--from-supernet", str(untrained_supernet)]


@pytest.fixture(scope="module")
def retrained(ray_session, from_supernet, tmp_path_factory) -> tuple:
    """The module's retrain, run once: (its run dir, its metrics). A test that changes the run puts it back."""
    out = tmp_path_factory.mktemp("retrain") / "run"
    return out, retrain(settings_for(*from_supernet), Placement(out))


def test_retrain_exports_a_model_both_loaders_rebuild(retrained, from_supernet, untrained_supernet):
    out, metrics = retrained
    assert metrics["arch"] == ARCH and metrics["epochs"] == 2
    assert 0 <= metrics["test_top1"] <= metrics["test_top5"] <= 100 and metrics["test_top5"] > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics

    ours = glit_ray.load_model(out)
    spec = json.loads((out / "arch.json").read_text())
    assert spec["model_args"]["arch"] == ARCH and spec["test_top1"] == metrics["test_top1"]
    via_timm = timm.create_model("glit", pretrained=True, **spec["model_args"], pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), **spec["pretrained_cfg"])).eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), via_timm(images), rtol=0, atol=0)
    # the exported weights are the trained ones, not a fresh initialisation nor the inherited ones
    exported = load_file(out / "model.safetensors")
    for start in (glit_ray.GLiT(ARCH, "glit_micro", num_classes=10), inherited_model(settings_for(*from_supernet), 10)):
        assert not torch.equal(exported["blocks.0.mlp.fc1.weight"], start.state_dict()["blocks.0.mlp.fc1.weight"])
    # the test top-1 it reports is the exported model's
    splits = build_splits("digits", 8, 1)
    assert evaluate(ours, None, eval_batches(splits, splits.test, "cpu"))["top1"] == pytest.approx(metrics["test_top1"])
    # and `python -m glit_ray.evaluate --model RUN_DIR` says so, on the data the run trained on
    run(evaluate_main, ["--model", str(out)])
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["data"] == "digits" and evaluation["images"] == 359
    assert (evaluation["top1"], evaluation["top5"]) == pytest.approx((metrics["test_top1"], metrics["test_top5"]))

    events = EventAccumulator(str(out / "tb")).Reload()
    assert {"train/loss", "train/lr", "epoch/heldout_top1", "epoch/test_top1"} <= set(events.Tags()["scalars"])
    before = (out / "model.safetensors").read_bytes()
    assert retrain(settings_for(*from_supernet), Placement(out)) == metrics  # finished: no work, nothing rewritten
    assert (out / "model.safetensors").read_bytes() == before
    # stopped after its last checkpoint but before the export: resuming trains nothing and exports the same
    for name in ("model.safetensors", "arch.json", "metrics.json"):
        (out / name).unlink()
    assert retrain(settings_for(*from_supernet), Placement(out, resume=True)) == metrics
    again = load_file(out / "model.safetensors")  # the same tensors (safetensors' header order varies by run)
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)


def supernet_path_score(supernet_file) -> dict:
    """What the search's evaluator measures for ARCH on digits by default: its scoring sets, through the supernet."""
    supernet, _ = load_supernet(supernet_file)
    splits = build_splits("digits", 8, 1)
    sets = scoring_sets(splits, *scoring_sizes("digits"), cluster=False)
    return score_on(supernet, Architecture.parse(ARCH), sets, torch.device("cpu"))


def test_inherited_weights_are_the_supernet_path(untrained_supernet):
    supernet, _ = load_supernet(untrained_supernet)
    model = inherited_model(settings_for("--arch", ARCH, "--from-supernet", str(untrained_supernet)), 10)
    expected = supernet.extract(Architecture.parse(ARCH)).state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_retrain_from_supernet_checks_inheritance_first(retrained, untrained_supernet):
    _, metrics = retrained
    assert metrics["from_supernet"] == str(untrained_supernet)
    # before training, the inherited model scores exactly what the supernet's path scored in the search
    path = supernet_path_score(untrained_supernet)
    assert metrics["inherited_heldout_top1"] == path["top1"]
    assert metrics["inherited_heldout_loss"] == pytest.approx(path["loss"], abs=1e-5)


def test_retrain_of_a_search_run_takes_its_space_and_data(tmp_path):
    run_dir = tmp_path / "search"
    run_dir.mkdir()
    (run_dir / "best.json").write_text(json.dumps({"level": "high", "arch": ARCH}))
    # the run file of a search of the previous release (2291a49) reads as this one's
    shutil.copy(Path(__file__).parent / "data" / "runs-2291a49" / "search.json", run_dir / "run.json")
    for value in (str(run_dir), str(run_dir / "best.json")):
        settings = settings_for("--arch", value)
        assert settings.arch == ARCH and settings.data == "digits" and settings.space.name == "glit_micro"
        assert settings.epochs == 300 and settings.recipe.drop_path == 0.1
        assert settings.recipe.preset == "small-data"  # 1,150 digits


def test_sigkilled_retrain_resumes_to_the_same_weights(retrained, from_supernet, tmp_path, cluster_env, capsys):
    reference, _ = retrained  # the same run, uninterrupted
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "glit_ray.retrain", *from_supernet, "--out", str(out)]
    kill_when(command, cluster_env, (out / "train" / "checkpoint_manager_snapshot.json").exists, "checkpoint")
    assert not (out / "model.safetensors").exists()
    retrain(settings_for(*from_supernet), Placement(out, resume=True))  # on another Ray: this session's
    assert "retrain: 1 worker x (0 GPU, 2 CPU) on head" in capsys.readouterr().err  # what it asked of Ray
    resumed, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "nowhere/best.json"], "--arch nowhere/best.json does not exist"),
    (["--arch", "two"], "architecture block 'two' is malformed"),
    (["--arch", "2:k5c2v1m4"], "distribution has 1 blocks but space glit_micro has depth 6"),
    (["--arch", ARCH, "--space", "glit_tiny"], "distribution has 6 blocks but space glit_tiny has depth 12"),
    (["--arch", ARCH, "--epochs", "0"], "--epochs must be at least 1"),
    (["--arch", ARCH, "--from-supernet", "/no/supernet.pt"], "supernet checkpoint /no/supernet.pt does not exist"),
    (["--arch", ARCH, "--batch-size", "800", "--workers", "2"], "a batch of 800 on each of 2 worker(s) is more than the"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, argv, message, cli_error):
    assert message in cli_error(main, [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_low_level_architecture_is_not_in_a_high_level_supernet(untrained_supernet, tmp_path, cli_error):
    low = ARCH.replace("k5c2v1m4", "k5c1v1m2", 1)
    err = cli_error(main, ["--arch", low, "--from-supernet", str(untrained_supernet), "--out", str(tmp_path / "run")])
    assert "is not the high-level default" in err


def test_load_model_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(glit_ray.UserError, match="holds no exported model"):
        glit_ray.load_model(tmp_path)
    export_model(glit_ray.GLiT(ARCH.replace("m4", "m6", 1), "glit_micro", num_classes=10), tmp_path)
    spec = json.loads((tmp_path / "arch.json").read_text())
    spec["model_args"]["arch"] = ARCH  # weights of another architecture
    (tmp_path / "arch.json").write_text(json.dumps(spec))
    with pytest.raises(glit_ray.UserError, match="does not hold this architecture's weights"):
        glit_ray.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(glit_ray.UserError, match="does not hold this architecture's weights"):
        glit_ray.load_model(tmp_path)
