"""Every place glit_ray leans on Ray past its public API, in one module, each with why and Ray's issue.

Each command's `main` applies the driver's part (`apply`: environment defaults and the console) before Ray
starts, and each Ray Train worker its own (`quiet_train_worker_log`); importing glit_ray changes nothing in Ray.
Each names the Ray issue or pull request behind it, or says that none of Ray's covers it. Code that calls `search`,
`train_supernet` or `retrain` from Python gets Ray's own console and Tune's own snapshot period
unless it calls `apply()` first. `tests/test_ray_workarounds.py` fails when Ray moves or changes
what one of these relies on; pyproject.toml pins Ray to the range those tests pass on.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs
import yaml
import ray
import ray.train
import ray.train.torch
import torch
from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
from ray.train._internal import storage as train_storage
from ray.train.torch.config import _TorchBackend
from ray.train.v2.api import data_parallel_trainer
from ray.tune.execution.tune_controller import TuneController
from ray.util.annotations import RayDeprecationWarning

from glit_ray.cluster.failure_policy import BadInputIsNotRetried
from glit_ray.core.files import write_atomic
from glit_ray.core.progress import WORKER_LINE, say

# Ray gives the head node this resource (Serve pins its controller with it); Ray has no public name for the head
# node (ray-project/ray#8438 proposed one and was closed)
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Ray's driver logs this error-level line (once) for a restartable actor whose constructor takes object-store
# references (ray-project/ray#53727: a restart would fail if they were gone); evaluator_pool holds them while its
# actors live, so the line only belongs in Ray's log file
RESTART_NOTE = "has constructor arguments in the object store"
# in the raylet's "N PYTHON worker processes have been started ... maximum expected startup concurrency", which it
# publishes whenever a Tune trial's Ray Train run starts its processes; C++ has no switch for it (ray-project/ray#63800)
STARTUP_NOTE = "maximum expected startup concurrency"
ENVIRONMENT_DEFAULTS = {
    "TUNE_GLOBAL_CHECKPOINT_S": "0",  # snapshot the searcher after every generation (Tune's default: adaptive)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # Parquet and tb/ hold the results; the JSON logger is added by name
    # Tune's new console prints its configuration box ("Number of trials 9223372036854775807") at any verbosity;
    # the old one prints nothing at verbose=0 (no RunConfig option turns the box off)
    "RAY_AIR_NEW_OUTPUT": "0",
}

# the file Tune's driver rewrites in place at each snapshot and restores a run from
EXPERIMENT_STATE = TuneController.CKPT_FILE_TMPL.format("*")

_applied = False


def apply() -> None:
    """The driver's part, for a command, before Ray starts: the environment defaults (a value already set wins), a
    console that shows only our lines (`_our_lines_only`) and Tune's snapshots copied whole (`_copied_whole`)."""
    global _applied
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import ray._private.worker as ray_worker

    if not getattr(ray_worker.print_to_stdstream, "ours", False):
        ray_worker.print_to_stdstream = _our_lines_only(ray_worker.print_to_stdstream)
    if not getattr(train_storage._upload_to_fs_path, "ours", False):
        train_storage._upload_to_fs_path = _copied_whole(train_storage._upload_to_fs_path)
    _applied = True


def _copied_whole(ray_upload):
    """Ray's upload of a folder or file to storage, which Tune's driver runs in a background thread after each
    snapshot, copying its staging folder (the experiment state, the searcher's state, the trials' results) into the
    run's `tune/` folder. Ray copies with pyarrow, writing each file in place: a command killed mid-copy leaves the
    experiment state cut short, and `Tuner.restore` then logs "Failed to restore the run state" and starts the
    experiment over without its trials' configurations (seen: a shortlist killed as its trials checkpointed). To a
    local folder, each file is read, then written beside its destination and renamed into place; and as Tune rewrites
    its experiment state in place while the previous copy may still run, one that does not parse is left for the
    next copy, keeping the last whole one. To other storage (S3 writes whole objects) and with `exclude` patterns,
    Ray copies as it does. No issue of Ray's covers it."""

    def upload(local_path: str, fs: pyarrow.fs.FileSystem, fs_path: str, exclude: list[str] | None = None) -> None:
        if exclude or not isinstance(fs, pyarrow.fs.LocalFileSystem):
            return ray_upload(local_path, fs, fs_path, exclude)
        source, target = Path(local_path), Path(fs_path)
        pairs = ([(path, target / path.relative_to(source)) for path in source.rglob("*")] if source.is_dir()
                 else [(source, target)])
        for path, copy in pairs:
            if path.is_dir():
                copy.mkdir(parents=True, exist_ok=True)
                continue
            data = path.read_bytes()
            if fnmatch.fnmatch(path.name, EXPERIMENT_STATE) and not _parses(data):
                continue
            write_atomic(copy, data, durable=False)
            os.chmod(copy, path.stat().st_mode & 0o7777)

    upload.ours = True
    return upload


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def _our_lines_only(ray_printer):
    """Ray's printer on the driver, for what it forwards from workers (`ray.init` hands it to its log thread) and the
    raylet's messages (its error listener looks it up at each one). Ray offers all or nothing (`log_to_driver`) and a
    skip pattern read when Ray is imported (`RAY_DEDUP_LOGS_SKIP_REGEX`, ray-project/ray#47913), which keeps Ray's
    prefix on the lines it lets through; no issue of Ray's asks for more. Of the workers' output, only our lines
    (`progress.say`, unprefixed) and tqdm_ray's bars print; Ray's own warnings and tracebacks stay in its log files.
    Of the raylet's messages, all but its note on worker start-ups (a worker killed for memory, a request no node
    can hold still print)."""
    from ray._private.worker import print_worker_logs

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines", [])
        if "ip" not in data:  # a raylet message from the error listener; forwarded output names its node's ip
            kept = [line for line in lines if STARTUP_NOTE not in line]
            if kept:
                ray_printer({**data, "lines": kept}, ignore_prefix)
            return
        bars = [line for line in lines if RAY_TQDM_MAGIC in line]
        if bars:
            print_worker_logs({**data, "lines": bars}, sys.stderr)  # past Ray's deduplication, which merges updates
        for line in lines:
            if line.startswith(WORKER_LINE):
                print(line[len(WORKER_LINE):], file=sys.stderr, flush=True)

    print_to_stdstream.ours = True
    return print_to_stdstream


@contextmanager
def quiet_actor_creation():
    """Around creating restartable actors whose arguments are object-store references: RESTART_NOTE stays out of a
    command's console (`stderr_without`); a no-op unless `apply` ran."""
    with stderr_without(RESTART_NOTE) if _applied else nullcontext():
        yield


@contextmanager
def stderr_without(marker: str):
    """Hold back what the process writes to its stderr (fd 2, Ray's C++ logging too) inside the block, then
    write it out without the lines holding `marker`. For a line Ray's core worker logs on the driver's console
    and in its own log file (python-core-driver-*.log) alike: the file keeps it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(line for line in held if marker.encode() not in line))


def quiet_train_worker_log() -> None:
    """In a Ray Train worker: drop its INFO line per report (about 700 characters an epoch on the driver's console).
    Ray Train logs it on a logger named after its source file, which `LoggingConfig(log_level=...)`
    (ray-project/ray#61550) does not reach: its filter takes only the `ray.train` loggers."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def actor_restarted() -> bool:
    """Whether Ray restarted the calling actor. (Ray's property reads its own deprecated `actor_id` inside, which
    warns: the warning is Ray's, not a deprecated call of ours; no issue of Ray's covers it.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def train_result(path: str) -> ray.train.Result:
    """`ray.train.Result.from_path`, which reads its snapshot with a deprecated call and warns: Ray's, not ours (no
    issue of Ray's covers it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.train.Result.from_path(path)


def trial_checkpoints_persisted() -> list[ray.train.Checkpoint]:
    """Every checkpoint this Tune trial's process persisted under its trial directory on the run's storage, oldest
    first, whether or not Tune's driver recorded it: a trial killed after its report, before the driver's next
    snapshot, is restored without it (`ray.tune.get_checkpoint()` gives an older one, or none). Tune has no call for
    them; the trial's storage context is Ray's developer API (no issue of Ray's covers it)."""
    from ray.train._internal.session import get_storage

    storage = get_storage()
    found = storage.storage_filesystem.get_file_info(pyarrow.fs.FileSelector(storage.trial_fs_path,
                                                                              allow_not_found=True))
    named = sorted(info.path for info in found
                   if info.type == pyarrow.fs.FileType.Directory and Path(info.path).name.startswith("checkpoint_"))
    return [ray.train.Checkpoint(path, storage.storage_filesystem) for path in named]


def gcs_node_groups() -> list:
    """The node groups an autoscaler reported to the GCS (KubeRay's v2 autoscaler does), [] where none did: Ray has
    no public call for the cluster's declared node types (ray-project/ray#37838 asks for one; Ray Data's own
    autoscaler reads the same private call, ray-project/ray#59682)."""
    config = ray._private.state.state.get_cluster_config()
    return list(config.node_group_configs) if config is not None else []


def kuberay_autoscaling_config(cluster_name: str, namespace: str) -> dict:
    """The autoscaling configuration KubeRay's autoscaler derives from the RayCluster resource, read as it reads it
    (Ray's private code: no public call shows a cluster's configuration, ray-project/ray#37838)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    return AutoscalingConfigProducer(cluster_name, namespace)()


KUBERNETES_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"  # in every pod
# the autoscaler's monitor process: a command line ending in this script, with --gcs-address= and
# --autoscaling-config= (the cluster launcher's `ray start --autoscaling-config`): where a head-node driver finds the
# launcher's configuration, which no public call shows (ray-project/ray#37838)
AUTOSCALER_MONITOR = "autoscaler/_private/monitor.py"


def kuberay_config() -> dict | None:
    """On a KubeRay pod (which has RAY_CLUSTER_NAME), the autoscaling configuration KubeRay's autoscaler derives from
    the RayCluster resource, read as it reads it (the head pod's service account may read its RayCluster); else
    None."""
    name, namespace_file = os.environ.get("RAY_CLUSTER_NAME"), Path(KUBERNETES_NAMESPACE_FILE)
    if not name or not namespace_file.is_file():
        return None
    try:
        return kuberay_autoscaling_config(name, namespace_file.read_text().strip())
    except Exception:  # no permission to read it (no in-tree autoscaling): the nodes up tell the shape
        return None


def autoscaler_config() -> dict | None:
    """The configuration this cluster's autoscaler runs with, when its monitor process is on this machine (a
    driver on the head node: `ray job submit`, `ray exec`), else None."""
    gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # a process that ended meanwhile, or one not ours to read
            continue
        if not any(arg.endswith(AUTOSCALER_MONITOR) for arg in args):
            continue
        options = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] == gcs_port and options.get("autoscaling-config"):
            try:
                return yaml.safe_load(Path(options["autoscaling-config"]).expanduser().read_text())
            except OSError:
                return None
    return None


class _DeviceTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with NCCL (TorchTrainer's choice for GPU workers) only where the workers see CUDA
    devices: GPU workers whose nodes show none (a fake GPU of Ray's autoscaler test provider; a node without its
    driver) connect over gloo and say so. TorchConfig's backend is chosen from `use_gpu` alone (no issue of Ray's
    covers it: a real GPU node has its devices)."""

    def on_start(self, worker_group, backend_config) -> None:
        if backend_config.backend == "nccl" and not all(worker_group.execute(torch.cuda.is_available)):
            say("the Ray Train workers hold GPUs but their nodes show no CUDA device: they train on the CPU, over gloo")
            backend_config = replace(backend_config, backend="gloo")
        super().on_start(worker_group, backend_config)


@dataclass
class DeviceTorchConfig(ray.train.torch.TorchConfig):
    """`TorchTrainer`'s torch config with `_DeviceTorchBackend`."""

    @property
    def backend_cls(self):
        return _DeviceTorchBackend


@contextmanager
def restarts_for_failures_only():
    """Ray Train runs started inside restart under `failure_policy.BadInputIsNotRetried`: Ray's `DataParallelTrainer.fit`
    builds its policy with the module-level `create_failure_policy` and takes no other (no Ray issue covers it)."""
    saved = data_parallel_trainer.create_failure_policy
    data_parallel_trainer.create_failure_policy = BadInputIsNotRetried  # built from the run's FailureConfig
    try:
        yield
    finally:
        data_parallel_trainer.create_failure_policy = saved


def torch_config(gpus: float) -> ray.train.torch.TorchConfig:
    """The torch config for Ray Train workers of `gpus` GPUs each: `DeviceTorchConfig` for GPU workers only. Ray Train's
    controller unpickles it, so the class costs each run an import of glit_ray (timm, torchvision) in the controller,
    3 s on the critical path before any worker starts; CPU workers use gloo under Ray's own config anyway."""
    return DeviceTorchConfig() if gpus > 0 else ray.train.torch.TorchConfig()
