import json
import os
import re
import random
import shutil
import statistics
import sys
import time
from unittest import mock

import pyarrow.parquet as pq
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from glit_ray.cluster.placement import Actors, Placement
from glit_ray.cluster.resources import evaluators
from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.models.cost import cost_range
from glit_ray.models.latency_table import write_table
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import load_supernet
from glit_ray.runs import from_json, to_json
from glit_ray.search import build_parser, main, search, settings_from_args
from glit_ray.searching.dispatch import Dispatcher
from glit_ray.searching.evaluator import Evaluator, evaluator_pool
from glit_ray.searching.results import read_candidates
from glit_ray.searching.settings import Latency
from glit_ray.train_supernet import train_supernet
from glit_ray.training.data import build_splits
from test_train_supernet import kill_when, ray_workers, signal_handlers, state_of, wait_for
from test_train_supernet import settings_for as supernet_settings

SMALL = ["--population", "8", "--generations", "3", "--mutations", "4", "--crossovers", "4", "--topk", "4",
         "--supernet-epochs", "2", "--heldout-images", "128"]

DIGITS = build_splits("digits", 8, 1)


def settings_for(*argv):
    return settings_from_args(build_parser().parse_args([*argv, "--out", "unused"]))


def check_run(out, level, generations=3, improves=True):
    rows = read_candidates(out).to_pylist()
    assert [r["generation"] for r in rows] == sorted(r["generation"] for r in rows)
    assert len({r["arch"] for r in rows}) == len(rows)  # each candidate once
    assert {r["generation"] for r in rows} == set(range(generations))
    per_generation = {g: [r for r in rows if r["generation"] == g] for g in range(generations)}
    assert len(per_generation[0]) == 8 and all(len(per_generation[g]) == 8 for g in range(1, generations))
    earlier = set()
    for g in range(generations):
        for row in per_generation[g]:
            assert row["level"] == level and row["status"] == "ok" and 0 <= row["top1"] <= 100
            assert row["flops"] > 0 and row["params"] > 0 and row["eval_seconds"] > 0 and row["node"]
            assert row["flops_convention"] == "macs"
            assert set(row["parents"]) <= earlier  # every parent is an earlier row
            assert (row["operator"] == "random") == (row["parents"] == [])
        earlier |= {r["arch"] for r in per_generation[g]}
    mean = lambda g: statistics.fmean(r["top1"] for r in per_generation[g])  # noqa: E731
    # children of the top-k score better on average than random generation 0 (a Pareto search trades top-1 for cost)
    assert mean(generations - 1) >= mean(0) or not improves
    return rows


def test_high_then_low_end_to_end(ray_session, high_search, micro, tmp_path):
    """The session's high-level search, then the low level on its best distribution, under a FLOPs limit: the low
    search trains its supernet on two Ray Train workers, their checkpoints in storage every node reaches, by URI
    (its mirror, as on a cluster)."""
    high, _ = high_search
    best_high = json.loads((high / "best.json").read_text())
    rows = check_run(high, "high", generations=4)
    assert best_high["arch"] == min(rows, key=lambda r: (r["loss"], -r["top1"], r["arch"]))["arch"]  # the lowest held-out loss
    assert any((high / "tb").iterdir())

    distribution = Architecture.parse(best_high["arch"]).distribution
    smallest, largest = cost_range(micro, "low", 10, distribution)
    flops_max = round((smallest.flops + largest.flops) / 2e6, 3)  # millions: the largest path is out, the smallest in
    low, bucket = tmp_path / "low", tmp_path / "bucket"
    # uniform paths, which keep inside the limit (a fair supernet trains every choice: test_settings)
    settings = settings_for("--level", "low", "--distribution", str(high), *SMALL, "--supernet-workers", "2",
                            "--flops-max", str(flops_max), "--supernet-sampling", "uniform")
    handlers = signal_handlers()
    best_low = search(settings, Placement(low, mirror=bucket.as_uri(), actors=Actors(count=1)), search_unlearnt=True)  # 2 epochs
    # Ray Train's and Tune's Ctrl-C handlers are gone with their runs (Train's holds the run's controller: so is it)
    assert signal_handlers() == handlers
    assert wait_for(lambda: not ray_workers(ray.get_runtime_context().gcs_address, ("ray::TrainController",)), 30), \
        "the supernet run's controller lives on"
    rows = check_run(low, "low")
    assert all(Architecture.parse(r["arch"]).distribution == distribution for r in rows)
    assert all(r["flops"] <= flops_max * 1e6 for r in rows)
    assert Architecture.parse(best_low["arch"]).distribution == distribution
    assert best_low["level"] == "low" and (low / "best.json").exists()

    # the supernet it trained: both workers ran each epoch on the same paths, checkpointed under the mirror
    path = low / "supernet" / "supernet.pt"
    net, meta = load_supernet(path)
    assert net.level == "low" and net.distribution == distribution and net.num_classes == 10
    assert meta["epochs"] == 2 and meta["limits"]["flops_max"] == flops_max
    assert meta["last_epoch"]["workers"] == 2
    assert list(bucket.glob("supernet/train/checkpoint_*/state.pt")) and not (low / "supernet" / "train").exists()
    assert set(meta["probe_top1"]) == {"smallest", "random0", "random1", "random2"}  # the largest is over the limit
    assert all(0 <= v <= 100 for v in meta["probe_top1"].values())
    assert net.extract(Architecture.parse(best_low["arch"]))(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    events = EventAccumulator(str(next((low / "supernet" / "tb").iterdir()))).Reload()
    assert {"train/loss", "train/lr", "epoch/images_per_s", "epoch/probe_smallest_top1", "epoch/probe_random0_top1"} <= \
        set(events.Tags()["scalars"])
    # and its curves are in the storage too, as they are after each epoch: rank 0's node may go, the storage stays
    [mirrored] = (bucket / "supernet" / "tb").iterdir()
    curves = EventAccumulator(str(mirrored)).Reload()
    assert [e.value for e in curves.Scalars("epoch/loss")] == [e.value for e in events.Scalars("epoch/loss")]
    assert len(curves.Scalars("epoch/loss")) == 2
    # training it again into the finished run does no work and changes nothing
    before = path.read_bytes()
    supernet = from_json("supernet", json.loads((low / "supernet" / "run.json").read_text())["settings"])
    assert train_supernet(supernet, Placement(low / "supernet", storage=f"{bucket.as_uri()}/supernet")) == path
    assert path.read_bytes() == before


class FaultyEvaluator(Evaluator):
    """The search's evaluator, whose next calls can be made to raise, or whose next call to kill its process
    mid-candidate, as a crash or a lost node would."""

    fail_next, exit_next = 0, False

    def score(self, arch_text: str) -> dict:
        if self.exit_next:
            os._exit(1)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError(f"injected failure on actor {self.actor_id}")
        return super().score(arch_text)

    def inject_failures(self, count: int) -> None:
        self.fail_next = count

    def inject_exit(self) -> None:
        self.exit_next = True


class GpuBlindEvaluator(Evaluator):
    """The search's evaluator on a node whose GPU Ray accounts to it but torch cannot see (no driver, a container
    without the NVIDIA runtime)."""

    def __init__(self, *args, **kwargs):
        with mock.patch.object(ray, "get_gpu_ids", return_value=[0]):
            super().__init__(*args, **kwargs)


def test_an_evaluator_given_a_gpu_it_cannot_see_stops_the_scoring_in_one_line(ray_session, untrained_supernet,
                                                                             shipped_by_value):
    with evaluator_pool(untrained_supernet.read_bytes(), DIGITS, 2, 64, evaluators(1, 0),
                        actor_class=GpuBlindEvaluator) as actors:
        with pytest.raises(UserError) as refused:
            Dispatcher(actors).score(["3:v1m4-3:v1m4-0:k5c2m4-2:k5c2v1m4-3:v1m4-3:v1m4"])
    assert re.fullmatch(r"the evaluator on node \S+ was given GPU 0 by Ray but torch \(.*\) sees no CUDA device .*; fix "
                        r"the node image \(on a test cluster of fake GPUs, set GLIT_RAY_FAKE_GPUS=1\)", str(refused.value))


def test_each_actor_loads_the_supernet_once_keeps_order_and_a_failing_or_dying_candidate_is_retried(
        ray_session, untrained_supernet, shipped_by_value):
    with evaluator_pool(untrained_supernet.read_bytes(), DIGITS, 2, 64, evaluators(2, 0),
                        actor_class=FaultyEvaluator) as actors:
        assert ray.get(actors[0].stats.remote())["loads"] == 1
        micro = SearchSpace.load("glit_micro")
        rng = random.Random(0)
        archs = list({str(micro.sample("high", rng)) for _ in range(30)})
        results = Dispatcher(actors).score(archs)
        assert [r["status"] for r in results] == ["ok"] * len(archs)
        assert {r["actor"] for r in results} == {0, 1}
        again = Dispatcher(actors).score(archs)
        assert [r["top1"] for r in again] == [r["top1"] for r in results]  # scoring is deterministic
        stats = ray.get([a.stats.remote() for a in actors])
        assert [s["loads"] for s in stats] == [1, 1]
        assert len({s["pid"] for s in stats}) == 2

        # a candidate whose scoring raises is tried once more, then recorded as failed
        one = actors[:1]
        ray.get(one[0].inject_failures.remote(1))
        [row] = Dispatcher(one).score(archs[:1])
        assert row["status"] == "ok" and row["top1"] == results[0]["top1"]
        ray.get(one[0].inject_failures.remote(2))
        [row] = Dispatcher(one).score(archs[:1])
        assert row["status"] == "failed" and "injected failure" in row["error"]

        # an actor whose process dies mid-candidate is restarted, reloads, and the candidate is scored again
        ray.get(actors[0].inject_exit.remote())
        dispatcher = Dispatcher(actors)
        rows = dispatcher.score(archs[:6])
        assert [r["top1"] for r in rows] == [r["top1"] for r in results[:6]] and dispatcher.lost_calls >= 1
        stats = ray.get([a.stats.options(max_task_retries=-1).remote() for a in actors], timeout=120)
        assert [s["restarted"] for s in stats] == [True, False] and [s["loads"] for s in stats] == [1, 1]
        again = Dispatcher(actors).score(archs[:6])  # the restarted actor scores like before
        assert [r["top1"] for r in again] == [r["top1"] for r in results[:6]] and {r["actor"] for r in again} == {0, 1}
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 1.8:  # the pool gives its CPUs back
        assert time.time() < deadline, ray.available_resources()
        time.sleep(0.2)


def test_a_search_killed_while_training_then_with_its_head_node_resumes_to_the_uninterrupted_run(
        ray_session, high_search, micro_supernet, tmp_path, cluster_env):
    """The session's search, mirrored, SIGKILLed twice: while it trains its supernet (resumed from the supernet's last
    checkpoint, in the mirror), then mid-search with its run directory deleted (the head node and its disk are gone:
    resumed from the mirror). Its supernet and its candidates are the uninterrupted run's."""
    reference, argv = high_search  # the same search, uninterrupted
    # the supernet it trains: `train_supernet --epochs 2 --batch-size 32`, without limits, so every probe path
    assert json.loads((micro_supernet.parent / "run.json").read_text())["settings"] == \
        json.loads(json.dumps(to_json(supernet_settings("--level", "high", "--epochs", "2", "--batch-size", "32"))))
    assert set(load_supernet(micro_supernet)[1]["probe_top1"]) == {"smallest", "largest", "random0", "random1", "random2"}

    out, bucket = tmp_path / "head" / "run", tmp_path / "bucket"
    command = [sys.executable, "-m", "glit_ray.search", *argv, "--out", str(out), "--mirror", bucket.as_uri()]
    # Ray Train writes its snapshot once a checkpoint's files are all in place: one it resumes from
    kill_when(command, cluster_env, (bucket / "supernet" / "train" / "checkpoint_manager_snapshot.json").exists,
              "supernet checkpoint in the mirror")
    assert not (out / "supernet" / "supernet.pt").exists()

    # a corrupt checkpoint is refused in one line, and the run's files are left as they were
    states = {path: path.read_bytes() for path in bucket.glob("supernet/train/checkpoint_*/state.pt")}
    for path in states:
        path.write_bytes(b"not a checkpoint")
    run_files = {path: path.read_bytes() for path in (out / "run.json", out / "supernet" / "run.json")}
    with pytest.raises(UserError, match=r"checkpoint .* is corrupt \(.*\); start the run again with a new --out"):
        search(settings_for(*argv), Placement(out, resume=True, mirror=bucket.as_uri(), actors=Actors(count=1)))
    assert {path: path.read_bytes() for path in run_files} == run_files and not (out / "supernet" / "supernet.pt").exists()
    for path, data in states.items():
        path.write_bytes(data)

    kill_when([*command, "--resume"], cluster_env, (bucket / "candidates" / "gen-0001.parquet").exists,
              "generation 1 in the mirror")
    assert not (bucket / "candidates" / "gen-0003.parquet").exists()
    for f in (bucket / "candidates").glob("*.parquet"):
        pq.read_table(f)  # whatever the mirror got is a whole file
    shutil.rmtree(tmp_path / "head")

    search(settings_for(*argv), Placement(out, resume=True, mirror=bucket.as_uri(), actors=Actors(count=1)))  # on a new head
    weights, uninterrupted = state_of(out / "supernet" / "supernet.pt"), state_of(micro_supernet)
    assert weights.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(weights[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    keys = ("arch", "generation", "operator", "parents", "top1")
    expected = [{k: r[k] for k in keys} for r in read_candidates(reference).to_pylist()]
    for run_dir in (out, bucket):  # the resumed run, and its mirror, hold the uninterrupted run's rows
        assert [{k: r[k] for k in keys} for r in read_candidates(run_dir).to_pylist()] == expected
        assert json.loads((run_dir / "best.json").read_text())["arch"] == json.loads((reference / "best.json").read_text())["arch"]
    assert len(expected) == 8 * 4


@pytest.mark.parametrize("argv, message", [
    (["--level", "sideways"], "argument --level: invalid choice: 'sideways'"),
    (["--level", "low"], "--level low needs --distribution RUN_DIR"),
    (["--level", "high", "--flops-max", "2"], "no architecture of glit_micro (high level) meets flops-max 2M"),
    (["--level", "high", "--params-min", "5", "--params-max", "4"], "--params-min 5M is above --params-max 4M"),
    (["--level", "high", "--flops-convention", "glit", "--flops-max", "2"],
     "no architecture of glit_micro (high level) meets flops-max 2M (glit FLOPs)"),
    (["--level", "high", "--mutation-prob", "1.5"], "--mutation-prob 1.5 is not a probability"),
    (["--level", "high", "--latency-max-ms", "0"], "--latency-max-ms 0 is not a positive time"),
    (["--level", "high", "--latency-batch", "0"], "--latency-batch must be at least 1"),
    (["--level", "high", "--supernet-workers", "0"], "--supernet-workers must be at least 1"),
    (["--level", "high", "--supernet-epochs", "0"], "--supernet-epochs must be at least 1"),
    (["--level", "high", "--supernet-workers", "40"], "a batch of 32 on each of 40 worker(s) is more than the"),
    (["--level", "high", "--mirror", "nosuch://bucket/run"], "--mirror nosuch://bucket/run: not a storage URI"),
    (["--level", "high", "--topk", "60"], "--topk 60 is more than the --population 50 that generation 0 scores"),
    (["--level", "high", "--mutations", "0", "--crossovers", "0"], "--mutations 0 and --crossovers 0 breed no child"),
    (["--level", "high", "--flops-max", "10.28"],
     "only 22 architecture(s) of glit_micro (high level) meet flops-max 10.28M, fewer than --population 50"),
])
def test_bad_input_before_ray(tmp_path, argv, message, cli_error):
    assert message in cli_error(main, [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_supernet_of_another_space_or_level_is_refused(untrained_supernet, tmp_path, micro_dict, write_space,
                                                         cli_error):
    micro_dict["name"], micro_dict["embed_dim"] = "glit_other", 48
    other = write_space(micro_dict)
    err = cli_error(main, ["--level", "high", "--space", str(other), "--supernet", str(untrained_supernet),
                                  "--out", str(tmp_path / "a")])
    assert "was trained on space glit_micro, not this search's glit_other" in err
    err = cli_error(main, ["--level", "low", "--distribution", "0:-1:-2:-3:-0:-1:", "--supernet",
                                  str(untrained_supernet), "--out", str(tmp_path / "b")])
    assert "is a high-level supernet; the low-level search needs its own" in err
    err = cli_error(main, ["--level", "high", "--supernet", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c")])
    assert "does not exist" in err
    assert not any((tmp_path / name).exists() for name in "abc")


def test_an_out_dir_holding_a_different_run_is_refused(untrained_supernet, tmp_path, cli_error):
    out = tmp_path / "run"
    out.mkdir()
    settings = settings_for("--level", "high", "--supernet", str(untrained_supernet))
    from glit_ray.core.files import write_json
    write_json(out / "run.json", {"kind": "search", "settings": to_json(settings)})
    (out / "best.json").write_text("{}")
    err = cli_error(main, ["--level", "high", "--supernet", str(untrained_supernet), "--search-unlearnt", "--seed", "3",
                           "--out", str(out)])
    assert "holds a different search run (seed: 0 -> 3)" in err
    assert (out / "best.json").read_text() == "{}"


def test_latency_is_measured_cached_and_a_limit_rejects_unscored(ray_session, untrained_supernet):
    from glit_ray.searching.evaluator import Evaluator
    from glit_ray.training.imagesets import scoring_sets

    arch = "3:v1m4-" * 5 + "3:v1m4"
    sets = scoring_sets(DIGITS, 1, 64)
    free = Evaluator(untrained_supernet.read_bytes(), sets, 0, latency=Latency(batch=2))
    row = free.score(arch)
    assert row["latency_ms"] > 0 and row["latency_source"] == "measured" and row["device"].startswith("cpu")
    assert 0 <= row["top1"] <= 100
    assert free.score(arch)["latency_ms"] == row["latency_ms"]  # measured once per architecture
    strict = Evaluator(untrained_supernet.read_bytes(), sets, 1, latency=Latency(batch=2, max_ms=1e-6))
    rejected = strict.score(arch)
    assert rejected["status"] == "rejected" and "over --latency-max-ms 1e-06" in rejected["error"]
    assert "top1" not in rejected and rejected["latency_ms"] > 0
    assert "latency_ms" not in Evaluator(untrained_supernet.read_bytes(), sets, 2).score(arch)


def test_a_pareto_search_under_a_latency_table_breeds_none_over_its_limit_and_reports_the_predictions(
        ray_session, untrained_supernet, micro_latency_table, tmp_path):
    """Latency predicted on the target device: the limit applied as children are bred (none scored is over it), the
    Pareto front and parents over it, and best.json, the report and the shortlist's candidates carrying it."""
    from glit_ray.report import report
    from glit_ray.searching import pareto
    from glit_ray.shortlist import top_candidates

    table, out = tmp_path / "table.json", tmp_path / "run"
    write_table(table, micro_latency_table)
    settings = settings_for("--level", "high", "--supernet", str(untrained_supernet), *SMALL, "--latency-table",
                            str(table), "--latency-max-ms", "0.66", "--objective", "pareto", "--pareto-cost", "latency")
    assert settings.latency is None and from_json("search", to_json(settings)) == settings  # run.json holds the table
    best = search(settings, Placement(out), search_unlearnt=True)
    rows = check_run(out, "high", improves=False)  # every candidate bred was scored: none over the limit
    latency = settings.latency_table
    assert all(r["latency_source"] == "table" and r["latency_ms"] == latency.ms(Architecture.parse(r["arch"])) <= 0.66
               for r in rows)
    assert best["supernet"] == {"learnt": None, "searched_unlearnt": True}  # no probes kept: said, and searched anyway
    assert json.loads((out / "best.json").read_text())["supernet"] == best["supernet"]
    front = [r["arch"] for r in pareto.front(rows, "latency_ms")]
    assert [r["arch"] for r in best["front"]] == front and best["front_cost"] == "latency_ms"
    assert json.loads((out / "best.json").read_text())["front"] == best["front"] and best["latency_source"] == "table"
    # every bred child's parents were on the lowest Pareto ranks of what had been scored before it
    for g in (1, 2):
        earlier = [r for r in rows if r["generation"] < g]
        allowed = {r["arch"] for r in pareto.select(earlier, 4, "latency_ms")}
        assert all(set(r["parents"]) <= allowed for r in rows if r["generation"] == g)
    assert all(c["latency_ms"] == latency.ms(Architecture.parse(c["arch"])) and c["latency_source"] == "table"
               for c in top_candidates(out, 3))
    summary = (report([out]) / "summary.md").read_text()
    assert "| ms |" in summary and f"{best['latency_ms']:.3g} ms (table)" in summary


def test_latency_is_measured_by_the_evaluators_unless_a_table_predicts_it(micro_latency_table, tmp_path, monkeypatch):
    for module in ("onnx", "onnxscript", "onnxruntime"):  # where the search runs, a table needs none of them
        monkeypatch.setitem(sys.modules, module, None)
    assert settings_for("--level", "high").latency is None
    assert settings_for("--level", "high", "--pareto-cost", "latency").latency == Latency(1, None)
    assert settings_for("--level", "high", "--latency-max-ms", "3", "--latency-batch", "4").latency == Latency(4, 3.0)
    write_table(tmp_path / "table.json", micro_latency_table)
    predicted = settings_for("--level", "high", "--latency-table", str(tmp_path / "table.json"), "--latency-max-ms", "3",
                             "--pareto-cost", "latency")
    assert predicted.latency is None and predicted.latency_table.max_ms == 3.0
    assert predicted.evolution.latency_table == predicted.latency_table and predicted.pareto_cost == "latency_ms"


def test_a_latency_table_that_cannot_serve_the_search_is_refused_before_ray(micro_latency_table, tmp_path, cli_error):
    table, out = tmp_path / "table.json", tmp_path / "run"
    write_table(table, micro_latency_table)
    run = ["--level", "high", "--latency-table", str(table), "--out", str(out)]
    assert ("no architecture of glit_micro (high level) meets --latency-max-ms 0.5: the fastest takes 0.588 ms"
            in cli_error(main, [*run, "--latency-max-ms", "0.5"]))
    assert ("none of 10000 random architectures of glit_micro meets both flops-min 12M and --latency-max-ms 0.6"
            in cli_error(main, [*run, "--latency-max-ms", "0.6", "--flops-min", "12"]))
    assert "give one of them" in cli_error(main, [*run, "--latency"])
    assert (f"--latency-batch 8 does not apply to {table}, timed at batch 1; drop --latency-batch, or build a table "
            "with `python -m glit_ray.latency_table --batch 8`") in cli_error(main, [*run, "--latency-batch", "8"])
    assert "measured for space glit_micro, not for glit_pico" in cli_error(main, [*run, "--space", "glit_pico"])
    write_table(table, {**micro_latency_table, "num_classes": 1000})
    assert ("measured with a head of 1000 classes, the data has 10; build one with python -m glit_ray.latency_table "
            "--space glit_micro --out TABLE.json --classes 10") in cli_error(main, run)
    write_table(table, {**micro_latency_table, "blocks_ms": dict(list(micro_latency_table["blocks_ms"].items())[1:])})
    assert "has no entry for 1 block option(s) of glit_micro" in cli_error(main, run)
    table.write_text(json.dumps(micro_latency_table)[:300])
    assert "cut short, or not JSON" in cli_error(main, run)
    assert not out.exists()


def test_resume_rebuilds_a_truncated_generation_file_from_tunes_snapshot(ray_session, high_search, tmp_path, capsys):
    finished, argv = high_search
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    rows = read_candidates(out).to_pylist()
    damaged = out / "candidates" / "gen-0001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:64])
    with pytest.raises(UserError, match="gen-0001.parquet is not a readable generation file"):
        read_candidates(out)
    capsys.readouterr()
    best = search(settings_for(*argv), Placement(out, resume=True))
    assert f"rebuilt the unreadable {damaged}" in capsys.readouterr().err
    keys = ("arch", "generation", "candidate", "operator", "parents", "top1", "status")
    assert [{k: r[k] for k in keys} for r in read_candidates(out).to_pylist()] == [{k: r[k] for k in keys} for r in rows]
    assert best["arch"] == min(rows, key=lambda r: (r["loss"], -r["top1"], r["arch"]))["arch"]  # the lowest held-out loss


def test_a_tune_snapshot_naming_code_this_version_lacks_is_one_line(ray_session, high_search, tmp_path):
    """Tune pickles our classes by module path: a snapshot written by a version whose modules were elsewhere (before
    the subpackages, glit_ray.searcher) cannot resume here, and says so instead of a traceback."""
    finished, argv = high_search
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    tuner = out / "tune" / "tuner.pkl"
    pickled = tuner.read_bytes()
    assert b"glit_ray.searching.searcher" in pickled
    tuner.write_bytes(pickled.replace(b"glit_ray.searching.searcher", b"glit_ray.searching.searchex"))  # same length
    with pytest.raises(UserError, match=r"tune: Tune's snapshot names code this glit_ray does not have \(No module "
                                        r"named 'glit_ray.searching.searchex'\): it was written by another version"):
        search(settings_for(*argv), Placement(out, resume=True))


def test_limits_in_the_authors_flops_convention_are_recorded_with_the_run():
    settings = settings_for("--level", "high", "--flops-convention", "glit", "--flops-max", "30")
    assert to_json(settings)["limits"] == {"flops_min": None, "flops_max": 30.0, "params_min": None, "params_max": None,
                                           "convention": "glit"}
    assert settings_for("--level", "high").limits.convention == "macs"


def test_the_console_shows_our_lines_and_none_of_rays(high_search_process):
    """The front door's console, as a log (the session's search, a `python -m glit_ray.search` process): a line per
    supernet epoch and per generation, the summary; none of Ray's lines (its start, Ray Train's report lines, Tune's
    box, C++ warnings, worker prefixes, tracebacks)."""
    _, console = high_search_process
    lines = console.splitlines()
    epochs = [line for line in lines if line.startswith("supernet epoch ")]
    assert [line.split(":")[0] for line in epochs] == [f"supernet epoch {e}/2" for e in range(1, 3)]
    # a fair step trains 4 paths on each image: the probes' share of an epoch allows them every 3rd epoch (every 9th
    # of one path a step), and the last epoch always has them
    assert "probes every 3 epochs" in epochs[0] and "probe top-1" in epochs[1]
    generations = [line for line in lines if line.startswith("generation ")]
    assert [line.split(":")[0] for line in generations] == [f"generation {g}/4" for g in range(1, 5)]
    best = json.loads((high_search_process[0] / "best.json").read_text())  # the best by the default objective
    assert generations[-1].endswith(f"; best so far: held-out loss {best['loss']:.4f} (top-1 {best['top1']:.2f}%)")
    assert any(line.startswith("best: ") for line in lines)
    # the recipe chosen for the digits' 1,150 training images, and the supernet's verdict (the run's last line of
    # training, then the search's check: stderr's lines, apart from the generations' lines on stdout)
    assert "recipe: small-data (chosen for 1,150 training images of 8 px) with --drop-path 0; lr 0.003 = 0.003 x " \
           "sqrt(32/32) (global batch 32 = 32 x 1 worker)" in lines
    verdict = [line for line in lines if line.startswith("verdict: ")]
    assert len(verdict) == 1 and verdict[0].startswith("verdict: learnt: ")
    assert any(line.startswith("supernet: learnt: its 5 probe paths score ") for line in lines)
    assert best["supernet"]["learnt"] and not best["supernet"]["searched_unlearnt"]
    # what it asked of the session's one 2-CPU node, and no wait: the node was up
    assert "supernet: 1 worker x (0 GPU, 2 CPU) on head" in lines
    assert "evaluators: 1 actor x (0 GPU, 1.8 CPU) on head" in lines
    assert not any(": waiting for " in line for line in lines)
    noise = ("Reporting training result", "TrainingReport", "Deprecat", "Configuration for experiment", "Number of trials",
             "core_worker", "Token authentication", "Ray instance", "pid=", "Traceback", "WARNING", "INFO", "(raylet)")
    assert [line for line in lines if any(word in line for word in noise)] == []
    # the top-k table is not folded to 80 columns in a log: its header is one line
    assert any("architecture" in line and "operator" in line for line in lines)
