"""Run settings: typed, frozen, stored in run.json and read back by one function that refuses what it does not know."""
import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from glit_ray import retrain, search, shortlist, train_supernet
from glit_ray.cluster.placement import Actors, Placement, Workers
from glit_ray.core.errors import UserError
from glit_ray.runs import from_json, to_json
from glit_ray.searching.settings import Latency
from glit_ray.synthetic import write_imagefolder
from glit_ray.training.settings import MIN_STEPS

PREVIOUS = Path(__file__).parent / "data" / "runs-2291a49"  # run.json files the previous release (2291a49) wrote
ARCH = "2:k5c2v1m4-1:k5c2v1m4-1:k5c2v1m4-3:v1m4-0:k5c2m4-1:k5c2v1m4"  # the best.json of its search run


def stored(kind: str) -> dict:
    return json.loads((PREVIOUS / f"{kind}.json").read_text())["settings"]


def test_the_previous_releases_search_reads_and_its_training_runs_are_refused_in_one_line(micro):
    """Before training recipes: a search's run file still names its space and data (retrain and the shortlist read
    them), with no supernet recipe recorded; a training run's `lr` cannot be resumed as the same recipe."""
    search_args = search.build_parser().parse_args(
        ["--level", "high", "--population", "8", "--topk", "4", "--latency", "--flops-max", "20", "--objective", "top1",
         "--supernet-epochs", "30", "--supernet-sampling", "uniform"])  # that release's supernet defaults
    today, old = search.settings_from_args(search_args), from_json("search", stored("search"))
    assert old.supernet_recipe is None
    assert dataclasses.replace(old, supernet_recipe=today.supernet_recipe) == today  # all else reads as it did
    assert from_json("search", stored("search")).latency == Latency(batch=1, max_ms=None)
    for kind in ("supernet", "retrain"):
        with pytest.raises(UserError, match="written before training recipes") as caught:
            from_json(kind, stored(kind))
        assert "\n" not in str(caught.value) and "start the run in a new --out" in str(caught.value)


def test_settings_round_trip_through_run_json():
    supernet_args = train_supernet.build_parser().parse_args(["--level", "high", "--epochs", "2", "--mixup", "0.2",
                                                              "--out", "x"])
    settings = train_supernet.settings_from_args(supernet_args)
    assert settings.recipe.mixup == 0.2 and settings.recipe.preset == "small-data"
    assert from_json("supernet", json.loads(json.dumps(to_json(settings)))) == settings


def test_the_supernet_a_search_trains_keeps_inside_its_limits_or_with_fair_paths_covers_every_choice():
    def trained(*argv):
        return search.supernet_settings(search.settings_from_args(search.build_parser().parse_args(
            ["--level", "high", "--flops-min", "10", "--flops-max", "14", "--supernet-epochs", "3", *argv])))

    uniform, fair = trained("--supernet-sampling", "uniform"), trained()
    assert (uniform.sampling, uniform.limits.flops_max, uniform.limits.flops_min, uniform.epochs) == ("uniform", 14, None, 3)
    assert (fair.sampling, fair.limits.flops_max, fair.epochs) == ("fair", None, 3)
    assert dataclasses.replace(fair, sampling="uniform", limits=uniform.limits) == uniform  # all else the same
    assert from_json("supernet", json.loads(json.dumps(to_json(fair)))) == fair


def test_a_supernets_default_epochs_are_the_compute_of_30_uniform_ones_and_limits_keep_it_uniform(folder224):
    def supernet(*argv, level="high"):
        given = ["--level", level, "--out", "x"] + (["--distribution", "1:-1:-1:-1:-1:-1:"] if level == "low" else [])
        return train_supernet.settings_from_args(train_supernet.build_parser().parse_args([*given, *argv]))

    # glit_micro on digits (35 steps of 32 an epoch): 4 choices a block at the high level, 9 at the low
    high, low = supernet(), supernet(level="low")
    assert (high.sampling, high.epochs, high.path_epochs) == ("fair", 8, 32)
    assert (low.sampling, low.epochs, low.path_epochs) == ("fair", 5, 45)  # 4 would be 140 steps: MIN_STEPS wants 5
    small = supernet("--space", "glit_pico", "--data", f"imagefolder:{folder224}")  # 320 images: 10 steps an epoch
    assert (small.epochs, small.epochs * 10) == (16, MIN_STEPS)
    limited = supernet("--flops-max", "14")  # only a uniform path keeps inside a limit
    assert (limited.sampling, limited.epochs, limited.limits.flops_max) == ("uniform", 30, 14)
    assert supernet("--sampling", "uniform", "--epochs", "12").path_epochs == 12
    searched = search.settings_from_args(search.build_parser().parse_args(["--level", "high"]))
    assert searched.supernet_path_epochs == search.supernet_settings(searched).path_epochs == 32


def test_a_shortlist_of_the_previous_release_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"written before training recipes") as caught:
        from_json("shortlist", stored("shortlist"))
    assert "\n" not in str(caught.value)


def test_settings_are_frozen_and_travel_whole(micro):
    settings = train_supernet.supernet_run(micro, "low", [0, 1, 2, 3, 1, 0], "digits")
    assert settings.distribution == (0, 1, 2, 3, 1, 0)  # a tuple however it is given
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3
    assert pickle.loads(pickle.dumps(settings)) == settings  # as Ray ships it to workers, actors and trials


def test_a_hand_edited_run_file_with_a_mistyped_key_is_refused_in_one_line(tmp_path, cli_error):
    out = tmp_path / "run"
    argv = ["--level", "high", "--epochs", "2", "--out", str(out)]
    settings = to_json(train_supernet.settings_from_args(train_supernet.build_parser().parse_args(argv)))
    settings["epoch"] = settings.pop("epochs")  # the typo
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"kind": "supernet", "settings": settings}))
    before = (out / "run.json").read_bytes()
    err = cli_error(train_supernet.main, [*argv, "--resume"])
    assert "unknown key 'epoch' in the supernet settings" in err and "start the run in a new --out" in err
    assert (out / "run.json").read_bytes() == before and [p.name for p in out.iterdir()] == ["run.json"]
    del settings["epoch"]
    (out / "run.json").write_text(json.dumps({"kind": "supernet", "settings": settings}))
    assert "the supernet settings lack 'epochs'" in cli_error(train_supernet.main, [*argv, "--resume"])
    settings["epochs"] = 2
    settings["limits"]["flop_max"] = settings["limits"].pop("flops_max")  # a typo one level down
    (out / "run.json").write_text(json.dumps({"kind": "supernet", "settings": settings}))
    err = cli_error(train_supernet.main, [*argv, "--resume"])
    assert "the supernet settings do not read" in err and "'flop_max'" in err


def test_placement_is_what_the_command_line_says_of_where_and_how(tmp_path):
    args = search.build_parser().parse_args(["--level", "high", "--actors", "3", "--gpus-per-worker", "1",
                                             "--mirror", "s3://bucket/run"])
    where = Placement.from_args(args, out=tmp_path / "default")
    assert where == Placement(tmp_path / "default", mirror="s3://bucket/run", workers=Workers(gpus=1.0),
                              actors=Actors(count=3))
    args = retrain.build_parser().parse_args(["--arch", ARCH, "--out", "rel", "--resume", "--loader-workers", "0"])
    assert Placement.from_args(args) == Placement(Path("rel").resolve(), resume=True, workers=Workers(loader_workers=0))
    args = shortlist.build_parser().parse_args([str(tmp_path), "--storage", "s3://b/p"])
    assert Placement.from_args(args, out=args.run_dir) == Placement(tmp_path, storage="s3://b/p")


def test_a_relative_data_path_is_stored_absolute_for_workers_that_run_elsewhere(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "folder", classes=2, train_per_class=2, val_per_class=1, size=32)
    monkeypatch.chdir(tmp_path)
    where = f"imagefolder:{tmp_path / 'folder'}"
    runs = [train_supernet.settings_from_args(train_supernet.build_parser().parse_args(
                ["--level", "high", "--space", "glit_pico", "--data", "imagefolder:folder", "--out", "o"])),
            search.settings_from_args(search.build_parser().parse_args(
                ["--level", "high", "--space", "glit_pico", "--data", "imagefolder:./folder"])),
            retrain.settings_from_args(retrain.build_parser().parse_args(
                ["--arch", "3:v1m4-3:v1m4-0:k31c2m4-2:k31c2v1m4", "--space", "glit_pico", "--data", "imagefolder:folder", "--out", "o"]))]
    assert [run.data for run in runs] == [where] * 3


def test_a_search_built_in_python_has_the_command_lines_defaults_and_checks(micro):
    from glit_ray.searching.settings import SearchRun

    settings_of = search.settings_from_args

    given = dict(space=micro)
    run = SearchRun(**given)
    parsed = search.build_parser().parse_args(["--level", "high"])
    assert settings_of(parsed) == dataclasses.replace(run, supernet_recipe=settings_of(parsed).supernet_recipe)
    assert (run.population, run.generations, run.topk, run.mutations, run.crossovers, run.mutation_prob,
            run.objective, run.supernet_epochs) == (parsed.population, parsed.generations, parsed.topk,
                                                   parsed.mutations, parsed.crossovers, parsed.mutation_prob,
                                                   parsed.objective, parsed.supernet_epochs)
    for wrong, message in [({"topk": 60}, "--topk 60 is more than the --population 50"),
                           ({"mutation_prob": 1.5}, "--mutation-prob 1.5 is not a probability"),
                           ({"level": "low"}, "--level low needs --distribution"),
                           ({"mutations": 0, "crossovers": 0}, "breed no child after generation 0"),
                           ({"calib_batches": 0}, "--calib-batches must be at least 1")]:
        with pytest.raises(ValueError, match=message):  # a UserError: one line from the command line
            SearchRun(**{**given, **wrong})
    with pytest.raises(ValueError, match="--latency-batch must be at least 1"):
        Latency(batch=0)


def test_training_settings_built_in_python_have_the_command_lines_defaults_and_checks(micro):
    from glit_ray import audit
    from glit_ray.training.recipe import PRESETS
    from glit_ray.training.settings import AuditRun, RetrainRun, ShortlistRun, SupernetRun

    recipe = PRESETS["small-data"]
    parsers = {SupernetRun: train_supernet.build_parser().parse_args(["--level", "high", "--out", "run"]),
               RetrainRun: retrain.build_parser().parse_args(["--arch", ARCH, "--out", "run"]),
               ShortlistRun: shortlist.build_parser().parse_args(["run"]),
               AuditRun: audit.build_parser().parse_args(["run"])}
    # a supernet's epochs default to None on both sides, resolved from its sampling (test above): compare the settings
    parsers[SupernetRun] = train_supernet.settings_from_args(parsers[SupernetRun])
    for kind, parsed in parsers.items():
        given = {"arch": ARCH} if kind is RetrainRun else {"sample": 20} if kind is AuditRun else {}
        run = kind(space=micro, recipe=recipe, **given)
        assert (run.epochs, run.batch_size, run.workers, run.seed) == (parsed.epochs, parsed.batch_size,
                                                                       parsed.workers, parsed.seed), kind
        with pytest.raises(ValueError, match="--batch-size must be at least 1"):  # a UserError from the command line
            kind(space=micro, recipe=recipe, batch_size=0, **given)
    assert search.build_parser().parse_args(["--level", "high"]).supernet_epochs == SupernetRun.epochs  # None: one rule
    with pytest.raises(ValueError, match="--sampling fair trains every choice"):
        SupernetRun(space=micro, recipe=recipe, sampling="fair", limits=dataclasses.replace(SupernetRun.limits,
                                                                                            flops_max=10.0))
    for wrong, message in [({"band": 1.5}, "--band 1.5 is not a share"), ({"seeds": 0}, "--seeds must be at least 1"),
                           ({"sample": 1}, "--sample 1 is too few")]:
        with pytest.raises(ValueError, match=message):
            AuditRun(space=micro, recipe=recipe, **{"sample": 20, **wrong})
