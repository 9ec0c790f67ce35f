"""glit_ray's leans on Ray past its public API (`glit_ray.cluster.ray_workarounds`), each checked against the Ray installed: a
test here fails when Ray moves or changes what one of them relies on."""
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.fs
import pytest
import ray
import ray._private.worker
import tomllib
import torch
from packaging.requirements import Requirement
from ray import tune
from ray.train._internal.session import get_storage

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.ray_workarounds import (AUTOSCALER_MONITOR, ENVIRONMENT_DEFAULTS, RESTART_NOTE, STARTUP_NOTE,
                                              _our_lines_only, stderr_without)
from glit_ray.training.loop import STATE_FILE
from glit_ray.training.trials import last_epoch_persisted

RAY = Path(ray.__file__).parent
ROOT = Path(__file__).resolve().parents[1]


def ray_python_source(*folders: str) -> str:
    return "".join(path.read_text(errors="replace") for folder in folders for path in (RAY / folder).rglob("*.py"))


def test_ray_is_pinned_to_the_range_these_tests_pass_on():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray_requirement] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    assert ray_requirement.specifier.contains(ray.__version__) and "<" in str(ray_requirement.specifier)


def test_a_commands_console_keeps_our_worker_lines_and_the_raylets_messages_but_its_startup_note(capsys):
    printer = _our_lines_only(ray._private.worker.print_to_stdstream)
    # what Ray's log thread hands on: a batch forwarded from a worker (it names the worker's node)
    printer({"ip": "192.0.2.2", "pid": 4242, "job": "01000000", "is_err": False, "localhost": "192.0.2.2",
             "lines": ["[glit_ray] supernet epoch 1/2: loss 2.1", "INFO Reporting training result 1", "Traceback (x)"]},
            ignore_prefix=False)
    # what Ray's error listener hands on: the raylet's messages
    note = ("WARNING: 8 PYTHON worker processes have been started on node: f08 with address: 192.0.2.2, which is 4x "
            "the maximum expected startup concurrency (2). This could be a result of using a large number of actors")
    memory = "Task was killed due to the node running low on memory."
    for line in (note, memory):
        printer({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out, err = capsys.readouterr()
    assert err.splitlines() == ["supernet epoch 1/2: loss 2.1"]
    assert memory in out and "startup concurrency" not in out


def test_ray_hands_its_printer_the_batches_and_messages_the_console_tells_apart():
    worker = inspect.getsource(ray._private.worker)
    # ray.init registers the module's printer for forwarded output, and the error listener calls it by name
    assert "functools.partial(print_to_stdstream, ignore_prefix=ignore_prefix)" in worker
    listener = inspect.getsource(ray._private.worker.listen_error_messages)
    assert "print_to_stdstream(" in listener and '"ip"' not in listener
    # forwarded batches name their node's ip
    assert '"ip": self.ip' in (RAY / "_private" / "log_monitor.py").read_text()


def test_the_notes_held_back_are_still_what_ray_writes():
    assert STARTUP_NOTE.encode() in (RAY / "core" / "src" / "ray" / "raylet" / "raylet").read_bytes()
    [core] = RAY.glob("_raylet*.so")
    assert RESTART_NOTE.encode() in core.read_bytes()


def test_stderr_without_holds_back_only_the_marked_lines_also_those_written_below_python(capfd):
    with stderr_without(RESTART_NOTE):
        os.write(2, f"[E core_worker.cc] Actor 'Evaluator' {RESTART_NOTE}\n".encode())
        os.write(2, b"a C++ line of another kind\n")
        print("a Python line", file=sys.stderr)
    print("after", file=sys.stderr)
    lines = capfd.readouterr().err.splitlines()  # (pytest's sys.stderr writes past fd 2: its order is its own)
    assert sorted(lines) == ["a C++ line of another kind", "a Python line", "after"]


def test_the_environment_defaults_are_read_by_ray():
    tune = ray_python_source("tune", "air")
    for name in ENVIRONMENT_DEFAULTS:
        assert re.search(rf'["\']{name}["\']', tune), name


def test_apply_sets_defaults_without_overriding_and_patches_once(monkeypatch):
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "60")
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.setattr(ray._private.worker, "print_to_stdstream", ray._private.worker.print_to_stdstream)
    monkeypatch.setattr(ray_workarounds, "_applied", False)
    ray_workarounds.apply()
    printer = ray._private.worker.print_to_stdstream
    ray_workarounds.apply()
    assert ray._private.worker.print_to_stdstream is printer and printer.ours
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "60" and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"


def test_ray_trains_report_logger_is_named_after_its_file():
    from ray.train.v2._internal.execution import context

    assert context.logger.name == context.__file__


def test_the_private_calls_exist_as_they_are_called():
    assert isinstance(inspect.getattr_static(ray.runtime_context.RuntimeContext, "was_current_actor_reconstructed"),
                      property)
    assert callable(ray._private.state.state.get_cluster_config)
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    assert list(inspect.signature(AutoscalingConfigProducer).parameters)[:2] == ["ray_cluster_name",
                                                                                  "ray_cluster_namespace"]
    monitor = (RAY / AUTOSCALER_MONITOR).read_text()
    assert '"--gcs-address"' in monitor and '"--autoscaling-config"' in monitor
    from ray.train.torch.config import _TorchBackend

    assert list(inspect.signature(_TorchBackend.on_start).parameters) == ["self", "worker_group", "backend_config"]
    assert isinstance(inspect.getattr_static(ray.train.torch.TorchConfig, "backend_cls"), property)


def test_the_head_node_has_its_resource_and_the_gcs_no_node_groups_on_a_local_cluster(ray_session):
    head = [n for n in ray.nodes() if n["Alive"] and ray_workarounds.HEAD_NODE_RESOURCE in n["Resources"]]
    assert len(head) == 1
    assert ray_workarounds.gcs_node_groups() == []


def test_reading_a_ray_train_run_warns_from_ray_and_train_result_keeps_it_quiet(high_search):
    run = str(high_search[0] / "supernet" / "train")  # the session's supernet: a Ray Train run
    with pytest.warns(DeprecationWarning):
        ray.train.Result.from_path(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ray_workarounds.train_result(run).checkpoint is not None




def test_tunes_snapshot_copy_skips_an_experiment_state_tune_is_rewriting(tmp_path):
    """Tune rewrites its experiment state in place while its previous copy into the run may still be reading it: a
    state that does not parse stays out of the run, which keeps the last whole one; the next copy takes the new one.
    Whole files keep their mode, as Ray's copy leaves them."""
    from ray.train._internal import storage as train_storage

    assert list(inspect.signature(train_storage._upload_to_fs_path).parameters) == ["local_path", "fs", "fs_path",
                                                                                    "exclude"]
    upload = ray_workarounds._copied_whole(None)  # Ray's own upload only serves other storage
    staging, storage = tmp_path / "staging", tmp_path / "tune"
    (staging / "trial_0").mkdir(parents=True)
    (staging / "trial_0" / "result.json").write_text('{"top1": 50.0}\n')
    (staging / "experiment_state-1.json").write_text('{"trial_data": "whole"}')
    upload(str(staging), pyarrow.fs.LocalFileSystem(), str(storage))
    (staging / "experiment_state-1.json").write_text('{"trial_data": "be')  # mid-rewrite
    (staging / "trial_0" / "result.json").write_text('{"top1": 50.0}\n{"top1": 61.0}\n')
    upload(str(staging), pyarrow.fs.LocalFileSystem(), str(storage))
    assert (storage / "experiment_state-1.json").read_text() == '{"trial_data": "whole"}'
    assert (storage / "trial_0" / "result.json").read_text().splitlines()[-1] == '{"top1": 61.0}'
    assert (storage / "trial_0" / "result.json").stat().st_mode == (staging / "trial_0" / "result.json").stat().st_mode


def unread_bytes(pipe: int) -> int:
    """How many bytes written into the pipe its reader has not read yet (FIONREAD, on either end)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.subprocess
def test_tunes_snapshot_copied_into_the_run_survives_a_kill_midway(tmp_path):
    """Tune's driver copies its staging folder into the run's `tune/` folder after each snapshot, through the upload
    a command replaces (Ray's writes each file in place: killed midway, it leaves the experiment state cut short and
    `Tuner.restore` starts the experiment over). Killed here while it copies the experiment state (a pipe: the copy
    waits inside it), the copy leaves the last whole snapshot where Tune looks for it."""
    import subprocess
    import time

    from ray.train._internal import storage as train_storage

    assert "_upload_to_fs_path," in inspect.getsource(train_storage._FilesystemSyncer._sync_up_command)
    assert "syncer.sync_up(" in (RAY / "tune" / "execution" / "experiment_state.py").read_text()
    staging, storage = tmp_path / "staging", tmp_path / "tune"
    staging.mkdir()
    storage.mkdir()
    (storage / "experiment_state-1.json").write_text('{"trial_data": "old"}')
    os.mkfifo(staging / "experiment_state-1.json")
    copy = ("import sys, pyarrow.fs; from glit_ray.cluster import ray_workarounds; from ray.train._internal import storage; "
            "ray_workarounds.apply(); storage._upload_to_fs_path(sys.argv[1], pyarrow.fs.LocalFileSystem(), sys.argv[2])")
    copier = subprocess.Popen([sys.executable, "-c", copy, str(staging), str(storage)])
    deadline = time.monotonic() + 60
    while True:  # the pipe opens for writing once the copier has opened it for reading
        try:
            pipe = os.open(staging / "experiment_state-1.json", os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert copier.poll() is None and time.monotonic() < deadline, "the copy never opened the experiment state"
            time.sleep(0.05)
    os.write(pipe, b'{"trial_data": "new", ')
    while unread_bytes(pipe):  # the copy has read them: it is midway, waiting in the pipe for the rest
        assert copier.poll() is None and time.monotonic() < deadline, "the copy never read the experiment state"
        time.sleep(0.01)
    copier.kill()
    copier.wait()
    os.close(pipe)
    assert [p.read_text() for p in storage.glob("experiment_state-*.json")] == ['{"trial_data": "old"}']


def test_ray_train_builds_its_failure_policy_where_we_put_ours_and_restarts_lost_workers_only_for_failures():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api import data_parallel_trainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    from glit_ray.core.errors import UserError
    from glit_ray.cluster.failure_policy import MAX_FAILURES, BadInputIsNotRetried

    source = inspect.getsource(data_parallel_trainer.DataParallelTrainer.fit)
    assert "failure_policy=create_failure_policy(self.run_config.failure_config)" in source
    with ray_workarounds.restarts_for_failures_only():
        policy = data_parallel_trainer.create_failure_policy(ray.train.FailureConfig(max_failures=MAX_FAILURES))
    assert isinstance(policy, BadInputIsNotRetried)
    assert data_parallel_trainer.create_failure_policy.__module__.startswith("ray.")  # put back after

    def failed(error: Exception) -> WorkerGroupError:
        return WorkerGroupError("worker 1 failed", {0: RuntimeError("collective aborted"), 1: error})

    # a lost node: restarted MAX_FAILURES times, then given up; bad input: at once, not counted
    assert policy.make_decision(failed(UserError("x.jpg is not an image"))) == FailureDecision.RAISE
    assert [policy.make_decision(failed(ActorDiedError())) for _ in range(MAX_FAILURES + 1)] == \
        [FailureDecision.RETRY] * MAX_FAILURES + [FailureDecision.RAISE]


@pytest.mark.subprocess
def test_the_failure_policy_reaches_ray_trains_controller_without_glit_ray(tmp_path):
    """Pickled by value: unpickling it (in Ray Train's controller) imports neither glit_ray nor torch."""
    import ray.cloudpickle

    from glit_ray.cluster.failure_policy import BadInputIsNotRetried

    policy = BadInputIsNotRetried(ray.train.FailureConfig(max_failures=2))
    (tmp_path / "policy.pkl").write_bytes(ray.cloudpickle.dumps(policy))
    probe = ("import sys, ray.cloudpickle; policy = ray.cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(type(policy).__name__, policy.failure_config.max_failures, "
             "[m for m in sys.modules if m.split('.')[0] in ('glit_ray', 'torch', 'timm')])")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "policy.pkl")], cwd=tmp_path, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert out.split() == ["BadInputIsNotRetried", "2", "[]"]


def lost_after_its_last_checkpoint(config):
    """A one-worker trial as `trials` runs it (2 epochs), killed after it persisted its last epoch's checkpoint but
    before Tune recorded it (written here straight into its trial directory); resumed, it reports the persisted one."""
    finished = tune.get_checkpoint() is None and last_epoch_persisted(2)
    if finished:
        tune.report(finished | {"resumed": True})
        return
    tune.report({"epoch": 0, "heldout_top1": 40.0})
    storage = get_storage()
    last = Path(storage.trial_fs_path, "checkpoint_000000")
    last.mkdir()
    torch.save({"epoch": 1, "metrics": {"epoch": 1, "heldout_top1": 41.0}}, last / STATE_FILE)
    raise RuntimeError("killed before Tune recorded its checkpoint")


def test_a_trial_resumed_without_its_last_checkpoint_finds_it_on_the_storage(ray_session, tmp_path,
                                                                            shipped_by_value):
    trainable = tune.with_resources(lost_after_its_last_checkpoint, {"cpu": 1})
    run = tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0)
    [lost] = tune.Tuner(trainable, run_config=run).fit()
    assert lost.error is not None and lost.checkpoint is None
    [resumed] = tune.Tuner.restore(str(tmp_path / "tune"), trainable, resume_errored=True).fit()
    assert resumed.error is None
    assert resumed.metrics["resumed"] and resumed.metrics["heldout_top1"] == 41.0
