import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import ray
import psutil  # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported)
import torch

from glit_ray.cluster.placement import Placement
from glit_ray.models.constraints import Limits
from glit_ray.models.cost import arch_cost
from glit_ray.runs import to_json
from glit_ray.train_supernet import build_parser, main, settings_from_args, train_supernet
from glit_ray.training.loop import input_bound
from glit_ray.training.supernet_loop import PathSampler, probe_every
import glit_ray.train_supernet
import glit_ray.training.fit
import glit_ray.training.supernet_loop as supernet_loop

FAST = ["--epochs", "1", "--batch-size", "64"]


def settings_for(*argv):
    return settings_from_args(build_parser().parse_args([*argv, "--out", "unused"]))


def state_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_path_sampler_is_a_function_of_seed_and_step(micro):
    a = PathSampler(micro, "high", None, Limits(), 10, seed=3)
    b = PathSampler(micro, "high", None, Limits(), 10, seed=3)
    assert [str(a(step)) for step in range(50)] == [str(b(step)) for step in range(50)]
    assert {len(a(step)) for step in range(50)} == {1} and len({a(step) for step in range(50)}) > 40
    limited = PathSampler(micro, "high", None, Limits(flops_max=13), 10, seed=3)
    assert all(arch_cost(micro, limited(s)[0], 10).flops <= 13e6 for s in range(50))


@pytest.mark.parametrize("level, distribution", [("high", None), ("low", (0, 1, 2, 3, 1, 0))])
def test_fair_sampling_puts_every_choice_of_every_block_in_one_path_of_each_step(micro, level, distribution):
    fair = PathSampler(micro, level, distribution, Limits(), 10, seed=3, sampling="fair")
    choices = micro.block_choices(level, distribution)
    steps = [fair(step) for step in range(20)]
    for paths in steps:
        assert len(paths) == max(map(len, choices))
        for position, allowed in enumerate(choices):
            assert sorted(map(str, (p.blocks[position] for p in paths))) == sorted(map(str, allowed))
    assert len({paths[0] for paths in steps}) == 20  # shuffled afresh each step
    assert [str(fair(s)) for s in range(20)] == [str(p) for p in steps]


def test_fair_sampling_with_limits_is_one_line(micro, tmp_path, cli_error):
    message = cli_error(main, ["--level", "high", "--space", "glit_micro", "--data", "digits", "--sampling", "fair",
                               "--flops-max", "13", "--out", str(tmp_path / "run")])
    assert "--sampling fair trains every choice of every block each step" in message
    assert not (tmp_path / "run").exists()


def test_probe_paths_are_the_extremes_and_three_random_paths_inside_the_limits(micro):
    distribution = (0, 1, 2, 3, 1, 0)
    unlimited = PathSampler(micro, "low", distribution, Limits(), 10, seed=0).probes()
    assert set(unlimited) == {"smallest", "largest", "random0", "random1", "random2"}
    costs = {name: arch_cost(micro, arch, 10).flops for name, arch in unlimited.items()}
    assert costs["smallest"] == min(costs.values()) and costs["largest"] == max(costs.values())
    limited = PathSampler(micro, "low", distribution, Limits(flops_max=14), 10, seed=0).probes()
    assert costs["largest"] > 14e6 and set(limited) == {"smallest", "random0", "random1", "random2"}
    assert all(a.distribution == distribution and arch_cost(micro, a, 10).flops <= 14e6 for a in limited.values())


def train_loop_on_desynced_paths(config: dict) -> None:
    """The supernet's train loop with each worker drawing its paths from a seed of its own."""
    rank = ray.train.get_context().get_world_rank()

    class Desynced(PathSampler):
        def __call__(self, step):
            return super().__call__(step + 1000 * rank)

    with mock.patch.object(supernet_loop, "PathSampler", Desynced):
        supernet_loop.train_loop(config)


def test_an_epoch_whose_loader_could_not_keep_up_says_so_in_its_line():
    fed = {"input_wait": 0.05, "step_images_per_s": 2900.0, "images_per_s": 2750.0}
    assert input_bound(fed) == ""
    starved = {"input_wait": 0.59, "step_images_per_s": 2845.0, "images_per_s": 1173.0}
    assert input_bound(starved) == ("; input-bound: the step runs 2845 images/s, 59% of the epoch waited for batches "
                                    "(raise --loader-workers or --cpus-per-worker)")


def test_probes_take_at_most_a_tenth_of_training():
    imagenet = 5 * (4 * 64 + 2048)  # five probes' calibration and held-out images
    assert probe_every(imagenet, 1_281_167 // 8) == 1  # ImageNet on 8 workers: every epoch
    assert probe_every(5 * (4 * 64 + 40), 10 * 32) == 16  # 10 batches of 32 a worker: every 16th epoch, and the last


def test_more_workers_than_the_cluster_holds_at_once_is_one_line_before_anything_is_written(ray_session, tmp_path,
                                                                                            cli_error):
    out = tmp_path / "run"  # the session's cluster: a head of 2 CPUs, no autoscaler
    line = cli_error(main, ["--level", "high", *FAST, "--workers", "3", "--out", str(out)])
    assert "supernet asks for 3 workers of (0 GPU, 1 CPU) at once, and the node types hold 2 at most" in line
    assert not out.exists()


def test_workers_on_different_paths_are_caught(ray_session, tmp_path, monkeypatch, shipped_by_value):
    monkeypatch.setattr(glit_ray.train_supernet, "train_loop", train_loop_on_desynced_paths)
    monkeypatch.setattr(glit_ray.training.fit, "MAX_FAILURES", 0)  # a bug, which Ray Train would restart 3 times first
    with pytest.raises(ray.train.TrainingFailedError, match="workers trained different paths"):
        train_supernet(settings_for("--level", "high", "--workers", "2", *FAST), Placement(tmp_path / "run"))


def wait_for(predicate, timeout: float) -> bool:
    """Whether `predicate()` holds within `timeout` seconds (polled every 50 ms)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# the titles of the Ray worker processes that write to a run: Ray Train's controller and workers, Tune's trials.
# (Not idle workers, nor detached helpers that outlive a run by design, such as Ray Train's placement group cleaner.)
WRITERS = ("ray::RayTrainWorker", "ray::TrainController", "ray::ImplicitFunc", "ray::GenerationTrial",
           "ray::ResourceTrainable")


def ray_workers(gcs_address: str, titles: tuple[str, ...], since: float = 0) -> list[psutil.Process]:
    """The worker processes the raylets of the Ray cluster at `gcs_address` started after `since` whose title (a Ray
    worker's command line: ray::RayTrainWorker) begins with one of `titles`."""
    raylets = {p.pid for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet"
               and f"--gcs-address={gcs_address}" in (p.info["cmdline"] or [])}
    return [p for p in psutil.process_iter(["create_time", "ppid", "cmdline"]) if p.info["create_time"] >= since
            and p.info["ppid"] in raylets and (p.info["cmdline"] or [""])[0].startswith(titles)]


def signal_handlers() -> list:
    """This process's Ctrl-C and SIGUSR1 handlers, the ones Ray Train and Tune install for a run."""
    return [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)]


def kill_when(command: list[str], env: dict, done, what: str, timeout: float = 180) -> None:
    """Run `command` in a process group of its own until `done()` holds (the child exiting first fails the test),
    then SIGKILL the group, as a lost machine would; return once the Ray worker processes the command started (its
    Ray Train and Tune actors, which Ray kills with their job) are gone too, so nothing writes to the run any more."""
    started = time.time() - 1
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        assert wait_for(lambda: done() or proc.poll() is not None, timeout) and proc.poll() is None, \
            f"no {what} within {timeout:.0f} s"
        workers = ray_workers(env["RAY_ADDRESS"], WRITERS, since=started)
        assert workers, f"none of the command's Ray Train or Tune processes was found at its {what}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers), 60), \
        "the killed command's Ray workers outlived it by a minute"


@pytest.mark.parametrize("argv, message", [
    (["--level", "middle"], "argument --level: invalid choice: 'middle'"),
    (["--level", "low"], "--level low needs --distribution"),
    (["--level", "low", "--distribution", "0:-1:-2:"], "distribution has 3 blocks but space glit_micro has depth 6"),
    (["--level", "low", "--distribution", "0:-1:-2:-3:-4:-0:"], "block 4: G = 4 is not in space glit_micro's global_heads"),
    (["--level", "high", "--flops-max", "1"], "no architecture of glit_micro (high level) meets flops-max 1M"),
    (["--level", "high", "--space", "glit_tiny", "--data", "imagefolder:/no/such/dir"], "dataset path /no/such/dir does not exist"),
    (["--level", "high", "--data", "cifar10:/no/such/dir"], "cifar10 has RGB images but the search space takes in_chans 1"),
    (["--level", "high", "--data", "mnist"], "unknown dataset 'mnist'"),
    (["--level", "high", "--mixup", "0.8", "--batch-size", "33"], "--batch-size 33 is odd, and mixup/cutmix"),
    (["--level", "high", "--recipe", "imagenet"], "argument --recipe: invalid choice: 'imagenet'"),
    (["--level", "high", "--reprob", "-0.25"], "--reprob -0.25 is not a probability; give a value in 0..1"),
    (["--level", "high", "--cutmix", "-1"], "--cutmix -1 is negative"),
    (["--level", "high", "--opt", "adamz"], "--opt 'adamz' is not one of timm's optimizers"),
    (["--level", "high", "--sched", "step"], "--sched 'step' is not supported; give one of cosine, tanh, poly"),
    (["--level", "high", "--scale", "0.9", "0.5"], "--scale 0.9 0.5: give two area fractions"),
    (["--level", "high", "--batch-size", "2048"], "a batch of 2048 on each of 1 worker(s) is more than the"),
    (["--level", "high", "--space", "glit_nano"], "search space 'glit_nano' not found"),
    (["--level", "high", "--torchcompile", "indcutor"], "'indcutor' is not a torch.compile backend; give one of"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, argv, message, cli_error):
    assert message in cli_error(main, [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_run_dirs_that_are_not_runs(tmp_path, cli_error):
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    err = cli_error(main, ["--level", "low", "--distribution", str(not_a_run), "--out", str(tmp_path / "x")])
    assert "not a high-level search run (no best.json)" in err
    err = cli_error(main, ["--level", "high", "--resume", "--out", str(not_a_run)])
    assert "is not a glit_ray run (no run.json)" in err
    (not_a_run / "notes.txt").write_text("mine")
    err = cli_error(main, ["--level", "high", "--out", str(not_a_run)])
    assert "is not empty and is not a glit_ray run" in err
    assert (not_a_run / "notes.txt").read_text() == "mine"


def test_a_different_run_is_never_overwritten(tmp_path, cli_error):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"kind": "supernet", "settings": to_json(settings_for("--level", "high"))}))
    (out / "supernet.pt").write_bytes(b"weights")
    err = cli_error(main, ["--level", "high", "--epochs", "5", "--out", str(out)])
    assert "holds a different supernet run (epochs: 8 -> 5)" in err
    assert (out / "supernet.pt").read_bytes() == b"weights"
    err = cli_error(main, ["--level", "high", "--out", str(out)])  # same settings: the damaged file is refused
    assert "is not a readable supernet checkpoint" in err
    assert (out / "supernet.pt").read_bytes() == b"weights"


@pytest.mark.subprocess
def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "glit_ray.train_supernet", "--level", "low", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --level low needs --distribution ARCH_STRING or a high-level RUN_DIR (the G per block)"]
