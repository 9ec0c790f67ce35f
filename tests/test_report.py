import random

import matplotlib.image
import pytest

from glit_ray.core.cli import run
from glit_ray.report import main, report
from glit_ray.searching.results import read_candidates, write_generation


def fake_run(run_dir, micro, seed):
    rng = random.Random(seed)
    archs = list(dict.fromkeys(str(micro.sample("high", rng)) for _ in range(60)))[:24]
    for g in range(3):
        rows = [{"arch": a, "level": "high", "generation": g, "candidate": i, "parents": [], "operator": "random",
                 "top1": rng.uniform(20, 90), "top5": 95.0, "loss": 1.0, "flops": rng.randrange(5, 15) * 10**6,
                 "params": 7 * 10**5, "eval_seconds": 0.1, "actor": 0, "node": "n", "trial_id": "t",
                 "timestamp": None, "status": "ok" if i else "failed", "error": None if i else "boom"}
                for i, a in enumerate(archs[8 * g: 8 * g + 8])]
        write_generation(run_dir, g, rows)
    return run_dir


def test_the_best_so_far_is_the_running_maximum_of_each_generations_best(micro, tmp_path):
    from glit_ray.report import run_summary

    rows = read_candidates(fake_run(tmp_path / "run", micro, 3)).to_pylist()
    summary = run_summary(rows)
    bests = [max(scores) for scores in summary["scores"].values()]
    assert summary["best_so_far"] == [max(bests[:g + 1]) for g in range(len(bests))]
    assert summary["best_so_far"][-1] == summary["best"]["top1"]


def test_report_writes_real_plots_and_a_summary_matching_the_parquet(micro, tmp_path):
    first, second = fake_run(tmp_path / "evolution", micro, 1), fake_run(tmp_path / "random", micro, 2)
    out = report([first, second])
    assert out == first / "report"
    for name in ("evolution.png", "pareto.png", "split.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 150 and image.shape[1] >= 400 and image.std() > 0.01  # a picture, not a blank
    summary = (out / "summary.md").read_text()
    for run_dir in (first, second):
        ok = [r for r in read_candidates(run_dir).to_pylist() if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["top1"])
        dominated = [r for r in ok if any(o["top1"] >= r["top1"] and o["flops"] <= r["flops"] and
                                          (o["top1"], o["flops"]) != (r["top1"], r["flops"]) for o in ok)]
        assert f"## {run_dir.name}" in summary
        assert f"24 candidates in 3 generations, 3 failed. Pareto front over FLOPs: {len(ok) - len(dominated)} candidates." in summary
        assert f"Best: `{best['arch']}`, top-1 {best['top1']:.2f} %" in summary


def test_a_dir_without_candidates_is_one_line_error(capsys, micro, tmp_path):
    good = fake_run(tmp_path / "good", micro, 1)
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(good), str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty holds no candidates" in err and err.count("\n") == 1
    assert not (good / "report").exists()


def test_a_truncated_generation_file_is_one_line_naming_it(micro, tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", micro, 1)
    damaged = run_dir / "candidates" / "gen-0001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        run(main, [str(run_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {damaged} is not a readable generation file") and "--resume to rebuild it" in err
    assert not (run_dir / "report").exists()
