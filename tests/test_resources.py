"""What work asks of the cluster (`glit_ray.cluster.resources.plan`), planned against the node shapes of the cluster files."""
import http.server
import importlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from dataclasses import replace
from unittest import mock
from pathlib import Path

import pytest
import ray
import torch
import yaml
from ray.exceptions import AuthenticationError
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from glit_ray.cluster.resources import (FAKE_GPUS_ENV, ClusterShape, NodeType, capacity, cluster_shape,
                                        config_node_types, placed_device, plan, waiting_note)
from glit_ray.core.errors import UserError
from test_retrain import ARCH as RETRAIN_ARCH

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"


def aws() -> ClusterShape:
    """The node types `ray up clusters/aws.yaml` declares (its head's CPUs as the launcher declares them)."""
    return ClusterShape(config_node_types(yaml.safe_load((CLUSTERS / "aws.yaml").read_text()), {}), "aws.yaml")


def kuberay() -> ClusterShape:
    """The node types KubeRay's autoscaler derives from the RayJob's cluster, the way Ray's KubeRay code does it."""
    spec = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "glit", "namespace": "ml"}, "spec": spec})
    return ClusterShape(config_node_types(config, {}), "kuberay-rayjob.yaml")


@pytest.mark.subprocess
def test_on_a_kuberay_head_the_node_types_come_from_the_api_server_as_rays_autoscaler_reads_them(tmp_path):
    """`ray_workarounds.kuberay_config` in a process set up as KubeRay's head pod is (RAY_CLUSTER_NAME, the pod's
    namespace file, the API server's address and credentials), against a loopback stand-in for Kubernetes' API server
    over HTTPS that serves the RayJob's cluster as a RayCluster: the node types planned with are the RayJob's."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    spec = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    raycluster = json.dumps({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                             "metadata": {"name": "glit", "namespace": "ml"}, "spec": spec}).encode()
    asked = []

    class APIServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            found = self.path == "/apis/ray.io/v1/namespaces/ml/rayclusters/glit"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(raycluster if found else b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), APIServer)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "namespace").write_text("ml")
    probe = ("import dataclasses, json, sys; from glit_ray.cluster import ray_workarounds, resources; "
             "ray_workarounds.KUBERNETES_NAMESPACE_FILE = sys.argv[1]; print(json.dumps([dataclasses.asdict(t) for t "
             "in resources.config_node_types(ray_workarounds.kuberay_config(), {})]))")
    pod = {**os.environ, "RAY_CLUSTER_NAME": "glit", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT_HTTPS": str(server.server_address[1]), "RAY_KUBERAY_CA_CERT_PATH": str(cert),
           # a client certificate: the pod's service-account token is not on this machine
           "RAY_KUBERAY_CLIENT_CERT_PATH": str(cert), "RAY_KUBERAY_CLIENT_KEY_PATH": str(key)}
    try:
        read = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "namespace")], env=pod, capture_output=True,
                              text=True, timeout=120)
    finally:
        server.shutdown()
    assert read.returncode == 0, read.stderr[-2000:]
    assert asked == ["/apis/ray.io/v1/namespaces/ml/rayclusters/glit"]
    assert [NodeType(**t) for t in json.loads(read.stdout)] == list(kuberay().node_types)
    assert {t.name: (t.cpus, t.gpus) for t in kuberay().node_types} == {"headgroup": (0, 0), "gpu": (7, 1), "cpu": (15, 0)}


def one_machine(cpus: float, gpus: float = 0) -> ClusterShape:
    return ClusterShape((NodeType("head", cpus, gpus, 1),), "the nodes up")


def test_a_p4d_hosts_eight_supernet_workers_with_its_cpus_shared_per_gpu():
    request = plan("supernet", 8, shape=aws())
    assert str(request) == "supernet: 8 workers x (1 GPU, 12 CPU) on gpu_a100x8"
    assert request.resources == {"CPU": 12, "GPU": 1}


def test_work_goes_to_the_node_type_that_holds_it_on_the_fewest_nodes_the_smallest_on_a_tie():
    assert str(plan("retrain", 1, shape=aws())) == "retrain: 1 worker x (1 GPU, 8 CPU) on gpu_a10g"
    assert plan("evaluate", 4, shape=aws(), unit="task").node_type == "gpu_a100x8"  # one node, not four
    assert str(plan("retrain", 16, shape=aws())) == "retrain: 16 workers x (1 GPU, 12 CPU) on gpu_a100x8"


def test_on_the_kuberay_shape_four_workers_ask_for_what_one_pod_has_not_the_clusters_cpus_divided():
    shape = kuberay()
    assert {t.name: (t.cpus, t.gpus) for t in shape.node_types} == {"headgroup": (0, 0), "gpu": (7, 1), "cpu": (15, 0)}
    request = plan("supernet", 4, shape=shape)
    assert str(request) == "supernet: 4 workers x (1 GPU, 7 CPU) on gpu"
    assert capacity(request, shape) == 16  # the group's maxReplicas


def test_gpus_are_asked_for_where_the_cluster_can_add_gpu_nodes_even_with_none_up():
    assert plan("supernet", 1, shape=kuberay()).gpus == 1  # the GPU group is at 0 replicas: no GPU is up
    assert plan("supernet", 1, shape=one_machine(2)).gpus == 0
    assert plan("supernet", 1, 0, shape=kuberay()).gpus == 0  # asked for explicitly: CPU workers


def test_on_one_machine_cpu_workers_share_its_cpus():
    assert str(plan("supernet", 2, shape=one_machine(2))) == "supernet: 2 workers x (0 GPU, 1 CPU) on head"
    assert plan("supernet", 1, shape=one_machine(2)).cpus == 2
    # tasks take turns: at least one CPU each, and Ray queues the rest
    assert str(plan("evaluate", 4, shape=one_machine(2), unit="task", together=False)) == \
        "evaluate: 4 tasks x (0 GPU, 1 CPU) on head"


@pytest.mark.parametrize("cpus, shape, most, named", [
    (None, one_machine(2), 2, "supernet asks for 3 workers of (0 GPU, 1 CPU) at once, and the node types hold 2 at "
                              "most: head (2 CPU, 0 GPU) (the nodes up); give at most 2 or lower --gpus-per-worker"),
    (None, kuberay(), 16, "supernet asks for 17 workers of (1 GPU, 7 CPU) at once, and the node types hold 16 at most"),
    # a p4d's share of its CPUs (12) fits no g5.2xlarge (8): only the 2 p4d hold such workers; with 8 CPUs both do
    (None, aws(), 16, "supernet asks for 17 workers of (1 GPU, 12 CPU) at once, and the node types hold 16 at most"),
    (8, aws(), 32, "supernet asks for 33 workers of (1 GPU, 8 CPU) at once, and the node types hold 32 at most"),
])
def test_more_workers_than_the_node_types_hold_at_once_are_one_line(cpus, shape, most, named):
    """Ray Train's workers start together or not at all: more than the cluster can ever hold would wait for ever."""
    assert plan("supernet", most, None, cpus, shape=shape).count == most
    with pytest.raises(UserError) as error:
        plan("supernet", most + 1, None, cpus, shape=shape)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_cpu_work_leaves_gpu_nodes_to_gpu_work_where_a_cpu_node_type_can_hold_it():
    shape = ClusterShape((NodeType("head", 0, 0, 1), NodeType("cpu", 16, 0, 4), NodeType("gpu", 8, 1, 4)), "test")
    assert plan("evaluate", 2, 0, shape=shape).node_type == "cpu"
    assert plan("evaluate", 2, 0, 6, shape=ClusterShape(shape.node_types[::2], "test")).node_type == "gpu"


@pytest.mark.parametrize("gpus, cpus, shape, named", [
    (2, None, kuberay(), "(2 GPU, 1 CPU) per worker, which no node type holds: headgroup (0 CPU, 0 GPU), gpu (7 CPU, 1 GPU)"),
    (None, 128, aws(), "(1 GPU, 128 CPU) per worker, which no node type holds"),
    (1, None, one_machine(2), "(1 GPU, 1 CPU) per worker, which no node type holds: head (2 CPU, 0 GPU) (the nodes up)"),
])
def test_a_request_no_node_type_holds_is_one_line_naming_it_and_the_node_types(gpus, cpus, shape, named):
    with pytest.raises(UserError, match="lower --gpus-per-worker") as error:
        plan("supernet", 4, gpus, cpus, shape=shape)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("command, argv, named", [
    ("search", ["--level", "high", "--gpus-per-actor", "1"], "evaluators asks for (1 GPU, 1 CPU) per actor, which "
                                                            "no node type holds: head (2 CPU, 0 GPU) (the nodes up"),
    ("retrain", ["--arch", RETRAIN_ARCH, "--cpus-per-worker", "3"],
     "retrain asks for (0 GPU, 3 CPU) per worker, which no node type holds"),
    ("shortlist", ["--gpus-per-worker", "1"], "shortlist asks for (1 GPU, 1 CPU) per worker, which no node type holds"),
])
def test_each_command_refuses_what_the_session_cluster_cannot_hold_before_writing(command, argv, named, tmp_path,
                                                                                  high_search, cli_error):
    """On the session's cluster (one 2-CPU head, no GPU, no autoscaler), through each command's `main`."""
    main = importlib.import_module(f"glit_ray.{command}").main
    if command == "shortlist":
        run_dir = tmp_path / "search"
        shutil.copytree(high_search[0], run_dir)
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        assert named in cli_error(main, [str(run_dir), *argv])
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no shortlist/ made
    else:
        assert named in cli_error(main, [*argv, "--out", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()


def test_a_wait_on_a_cluster_without_autoscaler_says_what_it_waits_for(ray_session):
    """The session's cluster shows no autoscaler: a request its head cannot hold yet waits for other work to go."""
    request = plan("supernet", 2, shape=cluster_shape())
    assert not request.autoscaled
    lines, said = [], threading.Event()
    more = replace(request, count=3)  # one more than the head's 2 CPUs hold
    with waiting_note(more, lambda line: (lines.append(line), said.set())):
        assert said.wait(60), "no note within 60 s"  # the watcher's first look, however slow the machine
    assert lines == ["supernet: waiting for other work to leave room for 1 more worker(s) of (0 GPU, 1 CPU), "
                     "0 s so far"]


def test_a_count_below_one_is_refused():
    with pytest.raises(UserError, match="at least 1 actor"):
        plan("evaluators", 0, unit="actor", shape=one_machine(2))


@pytest.mark.parametrize("cause, named", [
    (AuthenticationError("Authentication token is missing or incorrect"),
     "the Ray cluster at 10.0.0.1:6379 wants its authentication token: set RAY_AUTH_MODE=token"),
    (None, "no Ray cluster to join at 10.0.0.1:6379 (Could not find any running Ray instance.)"),
])
def test_a_cluster_that_cannot_be_joined_is_one_line(monkeypatch, cause, named):
    import glit_ray.training.fit as training

    def init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore") from cause

    monkeypatch.setattr(training.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(training.ray, "init", init)
    with pytest.raises(UserError, match=re.escape(named)) as error:
        training.ensure_ray("10.0.0.1:6379")
    assert "\n" not in str(error.value)


def test_ray_data_ingest_needs_cpus_the_training_workers_do_not_hold():
    from glit_ray.training.flags import check_ingest

    machine = one_machine(2)
    check_ingest("ray-data", plan("retrain", 1, cpus=1, shape=machine), machine)  # one CPU left to decode on
    check_ingest("loader", plan("retrain", 1, shape=machine), machine)  # the DataLoader needs none of its own
    with pytest.raises(UserError, match=r"--ingest ray-data decodes on CPUs the training workers do not hold, and "
                                        r"retrain: 1 worker x \(0 GPU, 2 CPU\) on head holds every CPU of"):
        check_ingest("ray-data", plan("retrain", 1, shape=machine), machine)
    check_ingest("ray-data", plan("supernet", 8, shape=aws()), aws())  # the cluster file's other node types decode


def test_a_process_given_a_gpu_it_cannot_see_refuses_unless_the_cluster_says_its_gpus_are_fake(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.3.7")
    monkeypatch.delenv(FAKE_GPUS_ENV, raising=False)
    with mock.patch.object(ray, "get_gpu_ids", return_value=[]):
        assert placed_device("evaluator") == torch.device("cpu")  # no GPU asked for: the CPU, as it should
    with mock.patch.object(ray, "get_gpu_ids", return_value=[1]):
        with pytest.raises(UserError, match=r"^the Ray Train worker on node 10\.0\.3\.7 was given GPU 1 by Ray but "
                                            r"torch .* sees no CUDA device .*NVIDIA runtime; fix the node image"):
            placed_device("Ray Train worker")
        monkeypatch.setenv(FAKE_GPUS_ENV, "1")
        assert placed_device("Ray Train worker") == torch.device("cpu")

