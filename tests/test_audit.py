"""The audit: a search's supernet ranking against networks trained on their own (a stratified sample, random
networks of the winner's cost, the all-global and all-local baselines), resumable after a kill, plotted by the report."""
import json
import math
import random
import re
import shutil
import statistics
import sys
from dataclasses import replace

import matplotlib.image
import pytest
import scipy.stats
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glit_ray.audit import (FOLDER, MIN_SAMPLE, RECORD, SAMPLE, TABLE, build_parser, choose_sample, main, read_table,
                            settings_from_args, spread, trials_of)
from glit_ray.core.cli import run
from glit_ray.core.errors import UserError
from glit_ray.core.files import write_json
from glit_ray.models.arch import Architecture
from glit_ray.models.cost import arch_cost
from glit_ray.models.latency_table import TableLatency, write_table
from glit_ray.report import report
from glit_ray.runs import RUN_FILE, check_run, to_json
from glit_ray.search import build_parser as search_parser
from glit_ray.search import settings_from_args as search_settings
from glit_ray.searching.ranking import audit_verdict, verdict_lines
from glit_ray.searching.results import ranked_architectures, write_generation
from glit_ray.training.loop import STATE_FILE
from test_train_supernet import kill_when

# the search's best and its last, the two baselines: 4 trials of 1 epoch, 2 at a time (the random group is drawn in
# test_the_sample_is_stratified..., its percentile computed in test_the_verdict_from_the_table...)
AUDIT = ["--sample", "2", "--top", "1", "--random", "0", "--epochs", "1", "--batch-size", "64"]


def fake_search(run_dir, micro, archs: int = 40, argv=()):
    """A finished high-level search's run directory (its run.json and two generations of scored candidates; no
    supernet): enough for everything the audit decides before it trains."""
    settings = search_settings(search_parser().parse_args(["--level", "high", *argv, "--out", str(run_dir)]))
    write_json(run_dir / RUN_FILE, {"kind": "search", "settings": to_json(settings)})
    rng = random.Random(0)
    drawn = list(dict.fromkeys(str(micro.sample("high", rng)) for _ in range(4 * archs)))[:archs]
    for generation in range(2):
        rows = []
        for i, arch in enumerate(drawn[generation::2]):
            cost = arch_cost(micro, Architecture.parse(arch), 10)
            rows.append({"arch": arch, "level": "high", "generation": generation, "candidate": i, "parents": [],
                         "operator": "random", "top1": rng.uniform(20, 90), "top5": 95.0, "loss": 1.0,
                         "flops": cost.flops, "params": cost.params, "status": "ok"})
        write_generation(run_dir, generation, rows)
    return settings


def audit_settings(run_dir, *argv):
    return settings_from_args(build_parser().parse_args([str(run_dir), *argv]), run_dir)


def test_spread_keeps_the_top_and_spaces_the_rest_evenly_down_to_the_last():
    assert spread(100, 8, 3) == [0, 1, 2, 3, 27, 51, 75, 99]
    assert spread(10, 10, 3) == list(range(10))  # the whole ranking
    assert spread(50, 4, 3) == [0, 1, 2, 49] and spread(50, 2, 3) == [0, 1]
    for ranked, sample, top in ((37, 12, 5), (200, 24, 5), (13, 13, 1)):
        picks = spread(ranked, sample, top)
        assert len(set(picks)) == sample and picks == sorted(picks) and picks[-1] == ranked - 1
        gaps = [b - a for a, b in zip(picks[top:], picks[top + 1:])]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced


def test_the_sample_is_stratified_random_networks_sit_in_the_band_and_the_baselines_are_all_global_and_all_local(
        micro, tmp_path):
    search = fake_search(tmp_path, micro, argv=["--flops-max", "12"])
    settings = audit_settings(tmp_path, "--sample", "10", "--top", "4", "--random", "6", "--band", "0.1")
    ranked = ranked_architectures(tmp_path)
    sample = choose_sample(settings, search, ranked, 10)
    groups = [row["group"] for row in sample]
    assert groups == ["top"] * 4 + ["quantile"] * 6 + ["random"] * 6 + ["plain-transformer", "convolution"]
    assert [row["supernet_rank"] for row in sample[:10]] == [r + 1 for r in spread(len(ranked), 10, 4)]
    assert sample[9]["supernet_rank"] == len(ranked)  # the quantiles reach the supernet's last
    assert [row["supernet_top1"] for row in sample[:10]] == [ranked[r]["top1"] for r in spread(len(ranked), 10, 4)]
    assert [row["winner"] for row in sample] == [True] + [False] * 17
    winner = ranked[0]["flops"]
    for row in sample[10:16]:  # inside the run's limits and within 10 % of the winner's FLOPs
        assert 0.9 * winner <= row["flops"] <= min(1.1 * winner, 12e6)
    assert len({row["arch"] for row in sample}) == len(sample)
    plain, conv = (Architecture.parse(row["arch"]) for row in sample[16:])
    assert plain.distribution == (3,) * 6 and conv.distribution == (0,) * 6
    assert plain.blocks[0] == micro.default_block(3)  # the high level's sizes
    assert choose_sample(settings, search, ranked, 10) == sample  # drawn from the seed: the same again


def test_the_random_group_of_a_search_under_a_latency_table_meets_its_limit(micro, micro_latency_table, tmp_path):
    write_table(tmp_path / "table.json", micro_latency_table)
    limited = ["--latency-table", str(tmp_path / "table.json"), "--latency-max-ms", "0.65"]
    drawn = {}
    for name, argv in (("free", []), ("limited", limited)):
        search = fake_search(tmp_path / name, micro, argv=argv)
        settings = audit_settings(tmp_path / name, "--sample", "4", "--top", "1", "--random", "12", "--band", "0.3")
        sample = choose_sample(settings, search, ranked_architectures(tmp_path / name), 10)
        drawn[name] = [TableLatency(micro_latency_table).ms(Architecture.parse(row["arch"]))
                       for row in sample if row["group"] == "random"]
    assert len(drawn["limited"]) == 12 and max(drawn["limited"]) <= 0.65 < max(drawn["free"])


def test_ranking_seeds_train_the_ranking_once_and_the_find_against_its_rivals_at_seeds(micro, tmp_path):
    search = fake_search(tmp_path, micro, archs=80, argv=["--supernet-epochs", "20"])  # fair: 4 paths, 80 path-epochs
    ranked = ranked_architectures(tmp_path)
    settings = audit_settings(tmp_path, "--sample", "6", "--top", "2", "--random", "3", "--seeds", "3",
                              "--ranking-seeds", "1")
    sample = choose_sample(settings, search, ranked, 10)
    trained = {}
    for trial in trials_of(sample, settings):
        trained.setdefault(trial.arch, []).append(trial)
    by_group = {}
    for row in sample:
        by_group.setdefault("winner" if row["winner"] else row["group"], set()).add(len(trained[row["arch"]]))
    assert by_group == {"winner": {3}, "top": {1}, "quantile": {1}, "random": {3}, "plain-transformer": {3},
                        "convolution": {3}}
    assert [t.seed for t in trained[sample[0]["arch"]]] == [0, 1, 2]
    names = [t.name for ts in trained.values() for t in ts]
    assert len(set(names)) == len(names) == 1 + 5 + 5 * 3 + 2  # 5 of the ranking at 1 seed, 6 networks at 3
    rows = [{**row, "standalone_top1": 40.0 + 7 * j + 2 * t.seed}  # the verdict: each network the mean of its seeds,
            for j, row in enumerate(sample) for t in trained[row["arch"]]]  # the noise from the networks with 3
    verdict = audit_verdict(rows, 2, ("plain-transformer",))
    assert verdict["networks"] == len(sample) and verdict["trainings"] == 23
    assert verdict["seed_sd"] == pytest.approx(2.0) and verdict["winner"]["standalone_top1"] == pytest.approx(42.0)
    sizes = []
    for seeds in (["--seeds", "2"], ["--seeds", "2", "--ranking-seeds", "1"]):  # the default sample: the supernet's
        sized = audit_settings(tmp_path, *seeds, "--epochs", "1", "--random", "0")  # compute, baselines at --seeds,
        trainings = len(trials_of(choose_sample(sized, search, ranked, 10), sized))  # the rest at --ranking-seeds
        assert sized.sample > MIN_SAMPLE and 79 <= trainings <= 80
        sizes.append(sized.sample)
    assert sizes[1] > 1.9 * sizes[0]


def test_an_audit_written_before_ranking_seeds_resumes_as_the_same_run(micro, tmp_path):
    fake_search(tmp_path, micro)
    settings = audit_settings(tmp_path, "--sample", "4", "--seeds", "2")
    stored = to_json(settings)
    del stored["ranking_seeds"]  # run.json as an audit wrote it before --ranking-seeds
    write_json(tmp_path / FOLDER / RUN_FILE, {"kind": "audit", "settings": stored})
    assert check_run(tmp_path / FOLDER, settings, resume=False)  # the same run: the same command resumes it
    with pytest.raises(UserError, match="ranking_seeds"):
        check_run(tmp_path / FOLDER, replace(settings, ranking_seeds=1), resume=False)


@pytest.mark.parametrize("argv, message", [
    (["--sample", "41"], "--sample 41 is more than the 40 distinct architectures the search scored; give --sample 40"),
    (["--random", "3000", "--band", "0.01"], "not the 3000 --random asks for; widen --band or lower --random"),
    (["--band", "1.5"], "--band 1.5 is not a share between 0 and 1"),
    (["--sample", "1"], "--sample 1 is too few: give at least 2"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--ranking-seeds", "0"], "--ranking-seeds must be at least 1"),
    (["--data", "digits"], "drop --space and --data"),
])
def test_bad_input_is_one_line_and_writes_nothing(micro, tmp_path, cli_error, argv, message):
    fake_search(tmp_path, micro)
    (tmp_path / "supernet").mkdir()
    (tmp_path / "supernet" / "supernet.pt").write_bytes(b"")  # checked for, not read, before the sample is drawn
    assert message in cli_error(main, [str(tmp_path), *argv])
    assert not (tmp_path / FOLDER).exists()


def test_a_run_without_a_finished_generation_or_not_a_search_is_one_line(micro, tmp_path, cli_error):
    assert "is not a glit_ray search run (no run.json)" in cli_error(main, [str(tmp_path)])
    fake_search(tmp_path, micro)
    for generation in (tmp_path / "candidates").iterdir():
        generation.unlink()
    assert "has no scored candidate yet (no finished generation)" in cli_error(main, [str(tmp_path)])
    assert not (tmp_path / FOLDER).exists()


def test_the_verdict_from_the_table_is_the_direct_computation():
    rng = random.Random(1)
    rows = []
    for j in range(12):
        group = "top" if j < 3 else "quantile" if j < 8 else "random" if j < 11 else "plain-transformer"
        supernet = None if group in ("random", "plain-transformer") and j % 2 else rng.uniform(50, 90)
        loss = None if supernet is None else rng.uniform(0.2, 2)
        for seed in range(2):
            rows.append({"arch": f"a{j}", "group": group, "winner": j == 0, "supernet_top1": supernet,
                         "supernet_loss": loss, "standalone_top1": rng.uniform(60, 95)})
    verdict = audit_verdict(rows, 3, ("plain-transformer",))
    means = {f"a{j}": statistics.fmean(r["standalone_top1"] for r in rows if r["arch"] == f"a{j}") for j in range(12)}
    scored = [r for r in rows[::2] if r["supernet_top1"] is not None]
    assert verdict["architectures"] == len(scored) == 10
    assert verdict["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(
        [r["supernet_top1"] for r in scored], [means[r["arch"]] for r in scored]).statistic)
    assert verdict["loss_kendall_tau"] == pytest.approx(scipy.stats.kendalltau(
        [-r["supernet_loss"] for r in scored], [means[r["arch"]] for r in scored]).statistic)
    assert verdict["by"] == "top1" and verdict["top1_kendall_tau"] == verdict["kendall_tau"]
    by_loss = audit_verdict(rows, 3, ("plain-transformer",), "loss")  # a search of the loss objective: its order
    assert by_loss["by"] == "loss" and by_loss["kendall_tau"] == by_loss["loss_kendall_tau"] == verdict["loss_kendall_tau"]
    assert by_loss["winner"] == verdict["winner"] and by_loss["random"] == verdict["random"]
    randoms = [means[a] for a in ("a8", "a9", "a10")]
    assert verdict["random"]["winner_percentile"] == pytest.approx(100 * sum(v < means["a0"] for v in randoms) / 3)
    assert verdict["margin_over"] == {"plain-transformer": pytest.approx(means["a0"] - means["a11"])}
    assert verdict["seed_sd"] == pytest.approx(statistics.fmean(
        statistics.stdev(r["standalone_top1"] for r in rows if r["arch"] == f"a{j}") for j in range(12)))

    def reading(standalone) -> str:  # the verdict's reading line when each row trains to standalone(i, row)
        scored = [{**r, "standalone_top1": standalone(i, r)} for i, r in enumerate(rows)]
        return verdict_lines(audit_verdict(scored, 3, ()))[-1]

    def warns(standalone) -> bool:  # the reading that says the trainings are too short to tell the networks apart
        return "train them longer (--epochs)" in reading(standalone)

    def against_random(winner_top1):  # the find against the random group (a8-a10 at 70, 80 and 90 %)
        return lambda i, r: winner_top1 if r["arch"] == "a0" else {"a8": 70, "a9": 80, "a10": 90}.get(r["arch"],
                                                                                                   r["standalone_top1"])

    above_all, above_two = reading(against_random(95)), reading(against_random(85))  # of the 3 random networks
    assert "its find is at or above the 80th percentile of random networks of its cost" in above_all
    assert "its find is below the 80th percentile of random networks of its cost" in above_two
    assert warns(lambda i, r: 20 + 10 * (i % 2))  # every network the same, each seed 10 points apart: noise only
    assert not warns(lambda i, r: 60 + 3 * int(r["arch"][1:]) + 0.5 * (i % 2))  # networks apart, seeds agree


def trial_checkpoints(folder, index: int) -> list:
    """The checkpoints Tune keeps of trial `index` of a command's `folder`, oldest first (a one-worker trial trains in
    its own process and checkpoints through Tune, under FOLDER/tune/<its trial directory, named ..._index=N_...>; a
    trial started just before a kill that Tune's snapshot had not recorded yet is started again in a new one)."""
    trials = [d for d in (folder / "tune").iterdir() if d.is_dir() and re.search(rf"_index={index}(_|$)", d.name)]
    return sorted((p for trial in trials for p in trial.glob("checkpoint_*") if p.is_dir()),
                  key=lambda p: p.stat().st_mtime)


def epochs_logged(trial_dir) -> list[int]:
    """The steps of every held-out top-1 a trial logged, across its TensorBoard files (a rerun adds a file)."""
    events = EventAccumulator(str(trial_dir / "tb"), purge_orphaned_data=False).Reload()
    return [e.step for e in events.Scalars("epoch/heldout_top1")]


def test_a_killed_audit_resumes_its_tune_trials_and_its_verdict_is_its_table(high_search, tmp_path, cluster_env,
                                                                            capsys):
    run_dir = tmp_path / "high"
    shutil.copytree(high_search[0], run_dir)
    folder = run_dir / FOLDER
    kill_when([sys.executable, "-m", "glit_ray.audit", str(run_dir), *AUDIT], cluster_env,
              lambda: any(folder.glob("a0[23]s0/tb/events*")), "a finished trial and a third started")
    assert not (folder / TABLE).exists()
    sample = (folder / SAMPLE).read_bytes()
    finished = [t for i, t in enumerate(("a00s0", "a01s0")) if trial_checkpoints(folder, i)]
    assert finished, "no trial had finished at the kill"
    run(main, [str(run_dir), *AUDIT])
    said = capsys.readouterr().err
    assert "resuming the audit" in said and "[4/4]" in said and "epoch 1/1" not in said
    assert "Kendall tau-b" in said and "found architecture:" in said
    assert (folder / SAMPLE).read_bytes() == sample  # drawn once
    rows = read_table(folder / TABLE)
    assert [r["group"] for r in rows] == ["top", "quantile", "plain-transformer", "convolution"]
    assert [r["arch"] for r in rows] == [s["arch"] for s in json.loads(sample)]
    assert all(r["epochs"] == 1 and r["seed"] == 0 and None not in (r["supernet_top1"], r["supernet_loss"]) for r in rows)
    assert rows[0]["winner"] and rows[0]["arch"] == json.loads((run_dir / "best.json").read_text())["arch"]
    for index, row in enumerate(rows):
        trained = torch.load(trial_checkpoints(folder, index)[-1] / STATE_FILE, weights_only=True)["metrics"]
        assert row["standalone_top1"] == trained["heldout_top1"] and "test_top1" not in trained
    for trial in finished:  # trained before the kill, and not again: the uninterrupted audit's figures
        assert len(epochs_logged(folder / trial)) == 1
    record = json.loads((folder / RECORD).read_text())
    # the session's search ranks by held-out loss (the default objective): so does the verdict
    assert record["verdict"] == json.loads(json.dumps(audit_verdict(rows, 1, ("plain-transformer", "convolution"),
                                                                    "loss")))
    tau = scipy.stats.kendalltau([-r["supernet_loss"] for r in rows], [r["standalone_top1"] for r in rows]).statistic
    assert record["verdict"]["kendall_tau"] == (None if math.isnan(tau) else pytest.approx(tau))

    before = {p: p.read_bytes() for p in (folder / TABLE, folder / RECORD)}
    run(main, [str(run_dir), *AUDIT])  # finished: nothing trained, nothing rewritten
    assert "already audited" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before

    out = report([run_dir])
    image = matplotlib.image.imread(out / "audit.png")
    assert image.shape[0] >= 300 and image.std() > 0.01
    summary = (out / "summary.md").read_text()
    assert "## Audit" in summary and "Kendall tau-b" in summary and "![audit](audit.png)" in summary
