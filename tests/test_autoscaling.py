"""GPU work on an autoscaling cluster, on one machine: Ray's fake multi-node provider with `clusters/aws.yaml`'s own
worker node types (their CPUs and GPUs, fewer of each; none up at the start) and a head with CPUs of its own (aws.yaml's
offers none: here work that asks for no GPU could land on it, so where work runs is a question of what it asks for),
token authentication on. A search's requests bring GPU nodes up, every Ray Train worker and evaluator runs on them, the
cluster scales back down, a training that loses a GPU node mid-run ends as an uninterrupted one, and a request no
node type holds is refused before anything is written. (KubeRay's shapes are planned in test_cluster_files and read
through a stand-in API server in test_resources.)

Torch sees no CUDA on a fake GPU node, so the work computes on the CPU while Ray accounts a GPU to it: the cluster's
nodes start with GLIT_RAY_FAKE_GPUS=1, without which a process given a GPU it cannot see refuses to run.
"""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from ray._private.services import get_node_ip_address

import psutil  # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported)

from glit_ray.cluster.resources import FAKE_GPUS_ENV
from glit_ray.searching.results import read_candidates

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY = str(Path(sys.executable).parent / "ray")
IDLE_TIMEOUT_MIN = 0.1  # an idle fake node goes after 6 s
# the RayJob's own command trains on 4 workers: on aws.yaml's node types they fit one 8-GPU node
GPU_SEARCH = ["--level", "high", "--supernet-epochs", "1", "--supernet-workers", "4", "--population", "4",
              "--generations", "1", "--mutations", "2", "--crossovers", "2", "--topk", "2", "--heldout-images", "64",
              "--actors", "2", "--search-unlearnt"]  # a supernet of one epoch: what is asked of Ray is the point
HEAD_CPUS = 2  # work that asks for no GPU may land on the head: where work runs is a question of what it asks for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


FAKE_MAX_NODES = 2  # of each node type: a fake node is processes on this machine


def aws_node_types() -> dict:
    """aws.yaml's worker node types as the fake provider takes them: their resources, at most FAKE_MAX_NODES each."""
    declared = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())["available_node_types"]
    return {name: {"resources": {**spec["resources"], "object_store_memory": 200 * 2**20}, "node_config": {},
                   "min_workers": 0, "max_workers": min(spec["max_workers"], FAKE_MAX_NODES)}
            for name, spec in declared.items() if spec["max_workers"] > 0}


NODE_TYPES = aws_node_types()
A10G, A100X8 = (NODE_TYPES[name]["resources"] for name in ("gpu_a10g", "gpu_a100x8"))


def fake_cluster_config(gcs_address: str) -> dict:
    """A cluster launcher configuration for Ray's fake multi-node provider (Ray's own example file is not in the
    wheel): a head of HEAD_CPUS CPUs and aws.yaml's worker node types, none up at the start."""
    return {
        "cluster_name": "glit-fake", "max_workers": FAKE_MAX_NODES * len(NODE_TYPES), "upscaling_speed": 4.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0}, **NODE_TYPES},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster(ray_session, tmp_path_factory):
    """The fake autoscaling cluster, started after the session's search (it needs the CPUs): {"env": a child's
    environment that joins it, "dashboard": its dashboard's address}. Stopped by killing only its own processes
    (Ray's `ray stop` would stop every Ray on the machine)."""
    folder = tmp_path_factory.mktemp("autoscaling")
    ip, port = get_node_ip_address(), free_port()
    ports = {option: free_port() for option in ("dashboard-port", "dashboard-agent-listen-port", "ray-client-server-port")}
    (folder / "cluster.yaml").write_text(yaml.safe_dump(fake_cluster_config(f"{ip}:{port}")))
    (folder / "token").write_text(secrets.token_hex(32))
    temp = tempfile.mkdtemp(prefix="gfake-", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(folder / "token"), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--num-cpus={HEAD_CPUS}", f"--port={port}", "--object-store-memory=200000000",
                    *(f"--{option}={p}" for option, p in ports.items()), f"--temp-dir={temp}",
                    f"--autoscaling-config={folder / 'cluster.yaml'}"],
                   # its nodes' fake GPUs have no device: their workers and evaluators compute on the CPU, by leave
                   env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", FAKE_GPUS_ENV: "1",
                        # a node killed is known dead within seconds, not after Ray's default of half a minute
                        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"},
                   check=True, capture_output=True, timeout=120)
    # its drivers know it as Ray's fake cluster too: all its nodes on this machine, one filesystem (`glit_ray.cluster.storage`)
    yield {"env": {**env, "RAY_ADDRESS": f"{ip}:{port}", "RAY_FAKE_CLUSTER": "1"},
           "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}"}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), 9)
        except OSError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def state(cluster: dict, what: str, *filters: str) -> list[dict]:
    """`ray list WHAT` of the fake cluster (its state API, with its token), as dicts."""
    args = [arg for f in filters for arg in ("--filter", f)]
    listed = subprocess.run([RAY, "list", what, *args, "--detail", "--format", "json", "--limit", "1000",
                             "--address", cluster["dashboard"]], env=cluster["env"], capture_output=True, text=True,
                            check=True, timeout=60)
    return json.loads(listed.stdout)


def gpu_nodes(cluster: dict) -> dict[str, str]:
    """The fake cluster's nodes that hold GPUs: node id -> state."""
    return {n["node_id"]: n["state"] for n in state(cluster, "nodes") if n["resources_total"].get("GPU")}


def asked(required: dict) -> dict:
    """An actor's request as the state API shows it, without its placement group's naming (a Ray Train worker asks
    for GPU_group_3_<group id>: a GPU of the group's bundle 3)."""
    return {name.split("_group_")[0]: amount for name, amount in required.items() if not name.startswith("bundle_")}


def test_a_request_no_node_type_holds_is_one_line_before_anything_is_written(autoscaling_cluster, tmp_path):
    out, too_many = tmp_path / "supernet", A100X8["GPU"] + 1  # GPUs per worker: more than the largest node has
    run = subprocess.run([sys.executable, "-m", "glit_ray.train_supernet", "--level", "high", "--epochs", "1",
                          "--gpus-per-worker", str(too_many), "--out", str(out)], env=autoscaling_cluster["env"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: supernet asks for ({too_many} GPU, 1 CPU) per worker, which no node type "
                                 "holds: ")
    for shape in (f"ray.head.default ({HEAD_CPUS} CPU, 0 GPU)", f"gpu_a10g ({A10G['CPU']} CPU, 1 GPU)",
                  f"gpu_a100x8 ({A100X8['CPU']} CPU, {A100X8['GPU']} GPU)", "(the autoscaler's node types)"):
        assert shape in run.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def gpu_search(autoscaling_cluster, tmp_path_factory) -> tuple[Path, str]:
    """A search that trains its supernet on 4 GPU workers and scores on 2 GPU evaluators, on a cluster with no GPU
    node up: its run dir and console."""
    assert gpu_nodes(autoscaling_cluster) == {}
    out = tmp_path_factory.mktemp("gpu-search") / "run"
    run = subprocess.run([sys.executable, "-m", "glit_ray.search", *GPU_SEARCH, "--out", str(out)],
                         env=autoscaling_cluster["env"], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout + run.stderr


def test_a_search_brings_gpu_nodes_up_from_zero_and_runs_every_worker_and_evaluator_on_them(autoscaling_cluster,
                                                                                          gpu_search):
    out, console = gpu_search
    # 4 workers fit one 8-GPU node (fewer nodes than 4 one-GPU ones), each with its GPU's share of the node's CPUs
    share = A100X8["CPU"] // A100X8["GPU"]
    assert f"supernet: 4 workers x (1 GPU, {share} CPU) on gpu_a100x8" in console
    assert f"supernet: waiting for the autoscaler to add room for 4 more worker(s) of (1 GPU, {share} CPU), 0 s so far" \
        in console
    assert "evaluators: 2 actors x (1 GPU, 1 CPU) on gpu_a100x8" in console
    nodes = gpu_nodes(autoscaling_cluster)
    workers = state(autoscaling_cluster, "actors", "class_name=RayTrainWorker")
    assert len(workers) == 4 and len({w["node_id"] for w in workers}) == 1  # together on one 8-GPU node
    assert {w["node_id"] for w in workers} <= set(nodes)
    evaluators = state(autoscaling_cluster, "actors", "class_name=Evaluator")
    assert len(evaluators) == 2 and {e["node_id"] for e in evaluators} <= set(nodes)
    # what Ray was asked: the GPUs by name (the head has CPUs to spare: a request without them could run there)
    assert [asked(w["required_resources"]) for w in workers] == [{"CPU": share, "GPU": 1.0}] * 4
    assert [asked(e["required_resources"]) for e in evaluators] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    rows = read_candidates(out).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["node"] for r in rows} <= set(nodes)  # every candidate scored on a GPU node


def test_the_cluster_scales_back_down_after(autoscaling_cluster, gpu_search):
    deadline = time.monotonic() + 60 + IDLE_TIMEOUT_MIN * 60
    while "ALIVE" in (nodes := gpu_nodes(autoscaling_cluster)).values():
        assert time.monotonic() < deadline, "GPU nodes still up a minute after the search"
        time.sleep(2)
    assert len(nodes) >= 1  # the search's nodes, all gone


def kill_node(node_id: str) -> int:
    """Kill every process of one fake node at once (its raylet, its agents, the workers its raylet started: Ray's
    fake provider starts them with the node's id in RAY_OVERRIDE_NODE_ID_FOR_TESTING), as a spot instance taken
    back; the number killed."""
    def on_node(process) -> bool:
        try:
            return process.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id
        except psutil.Error:  # gone, or not ours to read
            return False

    doomed = [p for p in psutil.process_iter() if on_node(p)]
    for p in doomed:
        p.kill()
    return len(doomed)


def test_a_training_that_loses_a_gpu_node_restarts_on_its_own_and_ends_as_an_uninterrupted_one(autoscaling_cluster,
                                                                                              micro_supernet, tmp_path):
    """The session search's supernet (`train_supernet --epochs 2 --batch-size 32`) trained again on a GPU node, the
    node killed once the first epoch is checkpointed: Ray Train restarts the worker from that checkpoint, the
    autoscaler brings up a node for it, and the run ends with the uninterrupted supernet's weights and probes."""
    out = tmp_path / "supernet"
    command = [sys.executable, "-m", "glit_ray.train_supernet", "--level", "high", "--epochs", "2", "--batch-size", "32",
               "--gpus-per-worker", "1", "--out", str(out)]
    proc = subprocess.Popen(command, env=autoscaling_cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("train/checkpoint_*")):  # an epoch is checkpointed: the next is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        [worker] = state(autoscaling_cluster, "actors", "class_name=RayTrainWorker", "state=ALIVE")
        assert kill_node(worker["node_id"]) >= 2
        console, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, console[-3000:]
    # one worker goes to the smallest GPU node type, aws.yaml's spot instances
    assert f"supernet: 1 worker x (1 GPU, {A10G['CPU']} CPU) on gpu_a10g" in console
    assert re.search(r"^supernet: resuming at epoch 2/2 from its last checkpoint$", console, re.M), console[-3000:]
    assert gpu_nodes(autoscaling_cluster)[worker["node_id"]] == "DEAD"
    assert json.loads((out / "run.json").read_text())["settings"] == \
        json.loads((micro_supernet.parent / "run.json").read_text())["settings"]
    ours, theirs = (torch.load(path, weights_only=True) for path in (out / "supernet.pt", micro_supernet))
    assert ours["meta"]["probe_top1"] == theirs["meta"]["probe_top1"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key in theirs["state_dict"]:
        torch.testing.assert_close(ours["state_dict"][key], theirs["state_dict"][key], rtol=0, atol=1e-6, msg=key)
