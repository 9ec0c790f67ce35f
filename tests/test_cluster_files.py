"""The cluster files: aws.yaml passes the cluster launcher's own schema, the RayJob runs the search."""
import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from glit_ray.search import build_parser, settings_from_args

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"


@pytest.fixture
def aws() -> dict:
    return yaml.safe_load((CLUSTERS / "aws.yaml").read_text())


def test_aws_yaml_passes_the_launchers_schema(aws):
    validate_config(prepare_config(copy.deepcopy(aws)))  # what `ray up` runs before launching anything


def test_the_schema_check_is_real(aws):
    aws["available_node_types"]["head"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(aws))


def test_aws_yaml_has_a_cpu_head_gpu_workers_and_the_pinned_stack(aws):
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"GPU": 0}
    gpu_types = {t["node_config"]["InstanceType"].split(".")[0] for n, t in types.items() if n != aws["head_node_type"]}
    assert gpu_types == {"g5", "p4d"}
    assert all(t["max_workers"] >= t["min_workers"] for t in types.values())
    assert aws["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    setup = " ".join(aws["setup_commands"])
    pyproject = (CLUSTERS.parent / "pyproject.toml").read_text()
    for package in ("torch", "torchvision"):
        pinned = re.search(rf'"{package}>=[\d.]+,<=([\d.]+)"', pyproject).group(1)
        assert f'"{package}=={pinned}"' in setup
    assert "pip install --quiet -e /home/ray/glit_ray" in setup and aws["file_mounts"]["/home/ray/glit_ray"] == "."
    assert "/mnt/data" in " ".join(aws["initialization_commands"])  # datasets on every node


def test_the_aws_search_command_mirrors_its_run_to_s3():
    """The command aws.yaml's header submits parses, and puts the run where a new head node can pull it from."""
    header = (CLUSTERS / "aws.yaml").read_text().split("cluster_name:")[0]
    lines = [line.lstrip("# ").rstrip() for line in header.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m glit_ray.search"))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))  # its continuation lines
    command = shlex.split(" ".join(line.rstrip("\\") for line in lines[start:end + 1]))
    args = build_parser().parse_args(command[3:])
    assert args.mirror.startswith("s3://") and args.address == "auto"
    assert settings_from_args(args)["space"]["name"] == "glit_tiny"


def test_the_rayjob_runs_the_search_entrypoint_with_valid_arguments():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "glit_ray.search"]
    args = build_parser().parse_args(command[3:])
    assert args.address == "auto" and str(args.out).startswith("/mnt/runs/")
    assert settings_from_args(args)["space"]["name"] == "glit_tiny"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    [worker] = spec["workerGroupSpecs"]
    [container] = worker["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert 1 < args.supernet_workers <= worker["replicas"]  # the supernet trains data-parallel, a GPU worker each
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mnt/runs" in mounts
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
