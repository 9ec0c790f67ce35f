"""The shortlist step: a high-level search's top distributions retrained briefly as Tune trials, the winner handed
to the low level."""
import json
import math
import shutil

import pytest
import scipy.stats
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glit_ray.core.cli import run
from glit_ray.models.arch import Architecture
from glit_ray.search import build_parser as search_parser
from glit_ray.search import settings_from_args as search_settings
from glit_ray.searching.results import read_candidates
from glit_ray.shortlist import main
from glit_ray.training.loop import STATE_FILE
from test_audit import trial_checkpoints
from test_train_supernet import signal_handlers

TRIALS = ["--top", "2", "--epochs", "2", "--batch-size", "64"]


def search_settings_for(*argv):
    return search_settings(search_parser().parse_args([*argv, "--out", "unused"]))


@pytest.fixture
def high_run(high_search):
    return high_search[0]


def said(capsys) -> str:
    """What our console printed (it writes to stderr) since the last call."""
    return "".join(capsys.readouterr())


def last_checkpoint_metrics(folder, index: int) -> dict:
    """The metrics in the newest checkpoint of the shortlist's trial `index`."""
    return torch.load(trial_checkpoints(folder, index)[-1] / STATE_FILE, weights_only=True)["metrics"]


def epochs_logged(trial_dir) -> list[int]:
    """The steps of every held-out top-1 a trial logged, across all its TensorBoard files (a rerun adds a file)."""
    events = EventAccumulator(str(trial_dir / "tb"), purge_orphaned_data=False).Reload()
    return [e.step for e in events.Scalars("epoch/heldout_top1")]


def test_the_top_distributions_train_as_tune_trials_and_the_winner_feeds_the_low_level(high_run, tmp_path, capsys):
    """Both trials train side by side under ASHA (their resume after a SIGKILL is the trials engine's, which
    test_audit kills; the shortlist adds only its record)."""
    run_dir = tmp_path / "high"
    shutil.copytree(high_run, run_dir)
    low = search_settings_for("--level", "low", "--distribution", str(run_dir))  # before a shortlist: the search's best
    assert "its search's best" in said(capsys)
    assert low.distribution == Architecture.parse(json.loads((run_dir / "best.json").read_text())["arch"]).distribution

    argv = [str(run_dir), *TRIALS, "--scheduler", "asha"]
    trials = [run_dir / "shortlist" / f"rank{rank}" for rank in (1, 2)]
    handlers = signal_handlers()
    run(main, argv)
    said_now = said(capsys)
    assert "shortlist: 2 workers x (0 GPU, 1 CPU) on head" in said_now and "[2/2]" in said_now
    assert signal_handlers() == handlers  # Tune's are gone with it
    record = json.loads((run_dir / "shortlist.json").read_text())
    rows = sorted((r for r in read_candidates(run_dir).to_pylist() if r["status"] == "ok"),
                  key=lambda r: (r["loss"], -r["top1"], r["arch"]))  # the search's order: the lowest held-out loss first
    assert [c["arch"] for c in record["candidates"]] == [r["arch"] for r in rows[:2]]
    assert [c["search_top1"] for c in record["candidates"]] == [r["top1"] for r in rows[:2]]
    assert record["scheduler"] == "asha"
    for index, (candidate, trial) in enumerate(zip(record["candidates"], trials)):  # ASHA may stop one after an epoch
        trained = last_checkpoint_metrics(run_dir / "shortlist", index)
        assert candidate["epochs"] == trained["epoch"] + 1 and candidate["shortlist_top1"] == trained["heldout_top1"]
        assert candidate["stopped_early"] == (candidate["epochs"] < 2)
        assert "test_top1" not in trained  # the shortlist never looks at the test split
        assert len(epochs_logged(trial)) == candidate["epochs"]  # curves in TensorBoard, one point an epoch
    assert not all(c["stopped_early"] for c in record["candidates"])
    assert record["winner"] == max(record["candidates"], key=lambda c: c["shortlist_top1"])
    trained = [c["shortlist_top1"] for c in record["candidates"]]
    tau = scipy.stats.kendalltau([2, 1], trained).statistic  # the search's order (its 1st, 2nd) against training's
    assert record["kendall_tau"] == (None if math.isnan(tau) else pytest.approx(tau))

    low = search_settings_for("--level", "low", "--distribution", str(run_dir))
    assert "distribution from the shortlist of" in said(capsys)
    assert low.distribution == Architecture.parse(record["winner"]["arch"]).distribution

    before = (run_dir / "shortlist.json").read_bytes()
    run(main, argv)  # finished: nothing retrained, nothing rewritten
    assert "already shortlisted" in said(capsys)
    assert (run_dir / "shortlist.json").read_bytes() == before


def test_bad_input_is_one_line(high_run, tmp_path, cli_error):
    assert "is not a glit_ray search run" in cli_error(main, [str(tmp_path), *TRIALS])
    assert "drop --space and --data" in cli_error(main, [str(high_run), *TRIALS, "--data", "digits"])
    assert "--top must be at least 1" in cli_error(main, [str(high_run), "--top", "0"])
    too_large = cli_error(main, [str(high_run), *TRIALS, "--batch-size", "2048"])
    assert "a batch of 2048 on each of 1 worker(s) is more than the" in too_large
    assert not (high_run / "shortlist").exists()


def test_bad_input_ends_a_trial_with_its_line_for_the_command_and_tune_does_not_retry_it(monkeypatch):
    from glit_ray.training import trials
    from glit_ray.core.errors import UserError

    def unreadable(config):
        raise UserError("x.jpg is not an image: replace or delete it")

    reports = []
    monkeypatch.setattr(trials, "_train_trial", unreadable)
    monkeypatch.setattr(trials.tune, "report", reports.append)
    trials.standalone_trial({})  # returns: Tune sees a trial that ended, not a failure to restart
    [report] = reports
    assert report[trials.BAD_INPUT] == "x.jpg is not an image: replace or delete it" and math.isnan(report[trials.METRIC])
