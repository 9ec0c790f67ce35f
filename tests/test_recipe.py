"""The training recipe as settings (timm's flag names, presets chosen from the data, the learning-rate rule) and the
supernet's verdict that keeps a search off a supernet that has not learnt."""
import dataclasses
import json
import math

import pytest
import torch

from glit_ray import retrain, search, shortlist, train_supernet
from glit_ray.cluster.placement import Placement
from glit_ray.models.supernet import GLiTSupernet, save_supernet
from glit_ray.runs import to_json
from glit_ray.training.recipe import PRESETS, Recipe, choose_preset, header
from glit_ray.training.verdict import Verdict, chance_of, of_meta

# timm's train.py names for DeiT's recipe, which every training command takes
TIMM_FLAGS = ["--opt", "--lr", "--lr-base", "--weight-decay", "--sched", "--warmup-epochs", "--warmup-lr", "--min-lr",
              "--aa", "--color-jitter", "--scale", "--hflip", "--reprob", "--remode", "--mixup", "--cutmix",
              "--mixup-prob", "--smoothing", "--drop-path", "--recipe"]


def test_the_preset_follows_the_training_splits_size_and_image_size():
    assert choose_preset(1_231_167, 224) == "deit"  # ImageNet less its held-out 50,000
    assert choose_preset(40_000, 32) == "small-data"  # CIFAR's training split less its held-out fifth
    assert choose_preset(500_000, 64) == "small-data"  # many, but small: DeiT's crops and RandAugment are for 224 px
    assert choose_preset(1_150, 28) == "small-data"
    deit, small = PRESETS["deit"], PRESETS["small-data"]
    assert (deit.mixup, deit.cutmix, deit.reprob, deit.aa, deit.warmup_epochs) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1", 5)
    assert not small.mixes and small.reprob == 0 and small.aa is None and small.smoothing == 0.1


def test_the_learning_rate_rule_is_timms_and_said_with_its_batch():
    deit, small = PRESETS["deit"], PRESETS["small-data"]
    assert deit.learning_rate(1024) == pytest.approx(1e-3)  # DeiT: 5e-4 x 1024 / 512
    assert deit.describe(256, 4) == "lr 0.001 = 0.0005 x 1024/512 (global batch 1024 = 256 x 4 workers)"
    assert small.learning_rate(128) == pytest.approx(3e-3 * math.sqrt(128 / 32))  # timm's sqrt rule for AdamW
    assert small.describe(32, 1) == "lr 0.003 = 0.003 x sqrt(32/32) (global batch 32 = 32 x 1 worker)"
    given = Recipe("small-data", lr=3e-3)
    assert given.learning_rate(4096) == 3e-3 and given.describe(64, 2).startswith("lr 0.003 (--lr; global batch 128")


def test_the_header_says_the_preset_why_the_flags_set_over_it_and_the_learning_rate():
    recipe = dataclasses.replace(PRESETS["small-data"], mixup=0.2)
    assert header(recipe, 3_200, 28, 128, 1) == ("recipe: small-data (chosen for 3,200 training images of 28 px) with "
                                                 "--mixup 0.2; lr 0.006 = 0.003 x sqrt(128/32) (global batch 128 = "
                                                 "128 x 1 worker)")
    assert header(PRESETS["deit"], 3_200, 28, 64, 1).startswith("recipe: deit (--recipe, on 3,200 training images")


def test_every_training_command_takes_timms_flags_and_the_search_its_supernets(tmp_path):
    parsers = {"train_supernet": train_supernet.build_parser(), "retrain": retrain.build_parser(),
               "shortlist": shortlist.build_parser()}
    for name, parser in parsers.items():
        options = parser._option_string_actions
        assert [flag for flag in TIMM_FLAGS if flag not in options] == [], name
    options = search.build_parser()._option_string_actions
    assert [flag for flag in TIMM_FLAGS if flag.replace("--", "--supernet-") not in options] == []
    settings = search.settings_from_args(search.build_parser().parse_args(
        ["--level", "high", "--supernet-recipe", "deit", "--supernet-mixup", "0.4", "--supernet-aa", "none"]))
    recipe = settings.supernet_recipe
    assert (recipe.preset, recipe.mixup, recipe.cutmix, recipe.aa, recipe.drop_path) == ("deit", 0.4, 1.0, None, 0.0)
    retraining = retrain.settings_from_args(retrain.build_parser().parse_args(
        ["--arch", "3:v1m4-" * 5 + "3:v1m4", "--smoothing", "0", "--warmup-epochs", "0", "--scale", "0.5", "1", "--out", "x"]))
    assert (retraining.recipe.smoothing, retraining.recipe.warmup_epochs, retraining.recipe.scale) == (0.0, 0, (0.5, 1.0))
    assert retraining.recipe.drop_path == 0.1 and to_json(retraining)["recipe"]["scale"] == (0.5, 1.0)


def test_a_resume_with_other_recipe_flags_is_refused_naming_them(tmp_path, cli_error):
    out = tmp_path / "run"
    out.mkdir()
    settings = train_supernet.settings_from_args(train_supernet.build_parser().parse_args(
        ["--level", "high", "--out", str(out)]))
    (out / "run.json").write_text(json.dumps({"kind": "supernet", "settings": to_json(settings)}))
    before = (out / "run.json").read_bytes()
    err = cli_error(train_supernet.main, ["--level", "high", "--mixup", "0.2", "--lr", "0.01", "--resume",
                                          "--out", str(out)])
    assert "holds a different supernet run (--lr None -> 0.01, --mixup 0 -> 0.2)" in err
    assert (out / "run.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_the_verdict_weighs_the_probes_against_chance_its_noise_and_their_spread():
    at_chance = Verdict({"smallest": 9.8, "largest": 12.8, "random0": 10.4, "random1": 11.1, "random2": 10.1}, 10.0, 280)
    assert not at_chance.learnt and at_chance.needed == pytest.approx(10 + 3 * 100 * math.sqrt(0.09 / 280))
    assert "NOT learnt: its 5 probe paths score 9.8-12.8% (median 10.4%) on 280 held-out images" in at_chance.line()
    learnt = Verdict({"smallest": 61.0, "largest": 88.0, "random0": 80.0, "random1": 75.0, "random2": 83.0}, 10.0, 288)
    assert learnt.learnt and learnt.line().startswith("verdict: learnt")
    one_path = Verdict({"smallest": 10.0, "largest": 70.0, "random0": 12.0, "random1": 26.0, "random2": 11.0}, 10.0, 288)
    assert not one_path.learnt and one_path.needed == 40.0  # a median of 12 % is not clear of half the spread
    assert Verdict({"a": 9.0, "b": 10.0, "c": 11.0}, 10.0, 100_000).needed == 15.0  # at least 5 points however many
    assert chance_of([0, 0, 1, 2]) == 50.0
    assert of_meta({"probe_top1": {}, "epochs": 0}) is None


def supernet_with_probes(micro, path, probes):
    torch.manual_seed(0)
    save_supernet(GLiTSupernet(micro, "high", num_classes=10), path, data="digits", epochs=2, seed=0,
                  probe_top1=probes, probe_chance=12.5, probe_images=288)
    return path


def test_a_search_on_a_supernet_at_chance_stops_in_one_line_before_anything_is_written(micro, tmp_path, cli_error):
    supernet = supernet_with_probes(micro, tmp_path / "supernet.pt",
                                    {"smallest": 11.1, "largest": 16.3, "random0": 11.5, "random1": 12.5, "random2": 14.0})
    out = tmp_path / "run"
    err = cli_error(search.main, ["--level", "high", "--supernet", str(supernet), "--out", str(out)])
    assert f"the supernet {supernet} has not learnt: its 5 probe paths score 11.1-16.3% (median 12.5%) on 288" in err
    assert "chance is 12.5%" in err and "more --supernet-epochs" in err and "--search-unlearnt" in err
    assert not out.exists()


@pytest.fixture(scope="session")
def digits28(tmp_path_factory, micro):
    """The shipped digits as a user's small folder: 28-px PNGs in ImageNet layout (1,438 train, 359 val), and
    glit_micro sized for it (4-px patches: 49 tokens)."""
    import yaml

    from glit_ray.synthetic import write_digits_folder

    root = tmp_path_factory.mktemp("digits28")
    space = {**micro.to_dict(), "name": "glit_micro28", "img_size": 28, "patch_size": 4, "in_chans": 3}
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    return write_digits_folder(root / "data"), root / "space.yaml"


def test_a_small_folder_of_28px_pngs_gets_the_small_data_recipe_and_learns(ray_session, digits28, tmp_path, capsys):
    """What the issue's user met (DeiT's recipe kept a network on such a folder near chance): the recipe chosen for
    1,150 training images, said in the header, and a network retrained with it for 2 epochs well above chance (with
    horizontal flips, timm's default, which a user of digits would turn off)."""
    folder, space = digits28
    arch = "3:v1m4-3:v1m4-0:k5c2m4-2:k5c2v1m4-3:v1m4-3:v1m4"
    metrics = retrain.retrain(retrain.settings_from_args(retrain.build_parser().parse_args(
        ["--arch", arch, "--space", str(space), "--data", f"imagefolder:{folder}", "--epochs", "2", "--batch-size", "32",
         "--out", str(tmp_path / "run")])), Placement(tmp_path / "run"))
    err = capsys.readouterr().err
    assert ("recipe: small-data (chosen for 1,150 training images of 28 px); lr 0.003 = 0.003 x sqrt(32/32) (global "
            "batch 32 = 32 x 1 worker)") in err
    assert metrics["test_top1"] >= 25, metrics  # chance is 10 %; 35.1 % measured (97 % after 10 epochs, P13r)
    stored = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["recipe"]
    assert stored["preset"] == "small-data" and stored["mixup"] == 0 and stored["aa"] is None
