"""Storage every node can reach: on a cluster that spans hosts, Ray Train's storage and the search's mirror must be a
URI or a shared filesystem, refused in one line before anything is written; one machine is unchanged."""
import importlib
import shutil
from dataclasses import replace

import pytest

from glit_ray.cluster import storage
from glit_ray.cluster.resources import ClusterShape, NodeType
from glit_ray.cluster.storage import check_reachable, mount_of, spans_hosts
from glit_ray.core.errors import UserError
from test_resources import aws as aws_file
from test_resources import kuberay as kuberay_file
from test_resources import one_machine
from test_retrain import ARCH as RETRAIN_ARCH

MOUNTS = """\
overlay / overlay rw,relatime 0 0
/dev/nvme0n1p1 /home/ray ext4 rw,relatime 0 0
fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/data nfs4 ro,vers=4.1 0 0
fs-0123.efs.us-west-2.amazonaws.com:/runs /home/ray/shared\\040runs nfs4 rw,vers=4.1 0 0
"""


def aws() -> ClusterShape:
    """The AWS file's node types, as the launcher's autoscaler declares them."""
    return replace(aws_file(), autoscaled=True)


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    (tmp_path / "mounts").write_text(MOUNTS)
    monkeypatch.setattr(storage, "MOUNTS", tmp_path / "mounts")
    monkeypatch.delenv("RAY_FAKE_CLUSTER", raising=False)


def test_the_filesystem_of_a_path_is_its_nearest_mount(mounts):
    assert mount_of(storage.Path("/home/ray/runs/tiny-high")) == ("/home/ray", "ext4")
    assert mount_of(storage.Path("/home/ray/shared runs/tiny-high/supernet")) == ("/home/ray/shared runs", "nfs4")
    assert mount_of(storage.Path("/mnt/data/imagenet")) == ("/mnt/data", "nfs4")
    assert mount_of(storage.Path("/tmp/x")) == ("/", "overlay")


def test_a_cluster_spans_hosts_where_an_autoscaler_declares_worker_types(mounts, monkeypatch):
    assert spans_hosts(aws()) and spans_hosts(replace(kuberay_file(), autoscaled=True))
    head_only = ClusterShape((NodeType("head", 8, 0, 1, head=True), NodeType("gpu", 8, 1, 0)), "test", autoscaled=True)
    assert not spans_hosts(head_only)  # its worker type may have no node
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # Ray's fake multi-node provider: every node on this machine
    assert not spans_hosts(aws())


@pytest.mark.parametrize("where, flag", [("/home/ray/runs/tiny-high", "--storage"),
                                         ("file:///home/ray/runs/tiny-high", "--mirror")])
def test_a_node_local_path_on_a_cluster_that_spans_hosts_is_one_line(mounts, where, flag):
    with pytest.raises(UserError) as refused:
        check_reachable(where, flag, aws())
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{where} is on this node's own disk (ext4 at /home/ray), which ")
    assert message.endswith(f"give {flag} s3://BUCKET/PREFIX (or a path on a filesystem every node mounts: NFS, EFS, "
                            "Lustre)")
    for reachable in ("s3://bucket/glit_ray/tiny-high", "gs://bucket/run", "/home/ray/shared runs/tiny-high"):
        check_reachable(reachable, flag, aws())  # a URI, a shared filesystem: accepted


def test_one_machine_takes_any_path(mounts, monkeypatch):
    monkeypatch.setattr(storage.ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.5"}] * 3)
    check_reachable("/home/ray/runs/x", "--storage", one_machine(8))  # three nodes up on one host: one filesystem
    monkeypatch.setattr(storage.ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i}"}
                                                       for i in range(2)])
    with pytest.raises(UserError, match="own disk"):
        check_reachable("/home/ray/runs/x", "--storage", one_machine(8))  # a fixed cluster of two hosts


@pytest.mark.parametrize("command, module, argv, flag", [
    ("train_supernet", "train_supernet", ["--level", "high", "--epochs", "1"], "--storage"),
    ("retrain", "retrain", ["--arch", RETRAIN_ARCH, "--epochs", "1"], "--storage"),
    ("search", "search", ["--level", "high", "--supernet-epochs", "1"], "--mirror"),
    ("audit", "training.trials", ["--epochs", "1"], "--storage"),
])
def test_each_command_refuses_node_local_storage_on_a_cluster_that_spans_hosts_before_writing(
        command, module, argv, flag, mounts, monkeypatch, tmp_path, high_search, cli_error):
    """Each command through its `main` on the session's Ray, told the cluster is the AWS file's."""
    monkeypatch.setattr(importlib.import_module(f"glit_ray.{module}"), "cluster_shape", aws)
    if command == "audit":
        run_dir = tmp_path / "search"
        shutil.copytree(high_search[0], run_dir)
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
        argv, out = [str(run_dir), *argv, "--sample", "2", "--random", "0"], run_dir
    else:
        out = tmp_path / "run"
        argv, before = [*argv, "--out", str(out)], None
    message = cli_error(importlib.import_module(f"glit_ray.{command}").main, argv)
    assert "which the other nodes of this cluster (" in message and f"give {flag} s3://BUCKET/PREFIX" in message
    if before is None:
        assert not out.exists()
    else:
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no audit/ made
