"""The cluster files: aws.yaml passes the launcher's schema and is locked down, the RayJob passes KubeRay's CRD schema,
the image is the pinned stack, and the commands they and the README's cluster section run parse."""
import copy
import gzip
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from glit_ray.search import build_parser, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAYJOB_CRD = Path(__file__).parent / "data" / "kuberay-v1.7.0-ray.io_rayjobs.yaml.gz"  # KubeRay v1.7.0's, unedited


@pytest.fixture
def aws() -> dict:
    return yaml.safe_load((CLUSTERS / "aws.yaml").read_text())


@pytest.fixture
def rayjob() -> dict:
    return yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())


def test_aws_yaml_passes_the_launchers_schema(aws):
    validate_config(prepare_config(copy.deepcopy(aws)))  # what `ray up` runs before launching anything


def test_the_schema_check_is_real(aws):
    aws["available_node_types"]["head"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(aws))


def test_aws_workers_declare_their_shape_write_s3_and_boot_a_gpu_ami(aws):
    types = aws["available_node_types"]
    head = types.pop(aws["head_node_type"])
    assert head["resources"]["GPU"] == 0 and head["max_workers"] == 0
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in types.values()} == {"g5", "p4d", "c6i"}
    assert types["cpu_c6i"]["resources"] == {"CPU": 32, "GPU": 0}  # decodes for --ingest ray-data
    for node_type in [head, *types.values()]:
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                                                              "base-oss-nvidia-driver-gpu-")
    for node_type in types.values():
        assert node_type["min_workers"] == 0 <= node_type["max_workers"]  # worker nodes come up for requests only
        assert node_type["resources"]["GPU"] >= 1 or node_type is types["cpu_c6i"]
        assert node_type["resources"]["CPU"] >= 8
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "glit-ray-worker"}  # Ray Train writes S3


def test_aws_nodes_run_the_image_the_dockerfile_builds_with_no_install_at_start_and_ray_sizes_shm(aws):
    assert aws["docker"]["image"].endswith("/glit-ray:0.1.0-gpu")
    assert not any("--shm-size" in option for option in aws["docker"]["run_options"])
    assert "-v /mnt/data:/mnt/data:ro" in aws["docker"]["run_options"]
    commands = " ".join(aws["setup_commands"] + aws["head_setup_commands"] + aws["worker_start_ray_commands"])
    assert "torch" not in commands
    assert aws["file_mounts"]["/home/ray/glit_ray"] == "."  # over the image's editable install, same path
    assert "/mnt/data" in " ".join(aws["initialization_commands"])  # datasets on every node


def test_aws_control_plane_needs_the_token_and_the_dashboard_stays_on_localhost(aws):
    for command in (aws["head_start_ray_commands"][-1], aws["worker_start_ray_commands"][-1]):
        assert "export RAY_AUTH_MODE=token;" in command and "ray start" in command
        assert "dashboard-host" not in command
    assert aws["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def commented_command(text: str, program: str) -> list[str]:
    """The arguments of the command `program` that a line of a commented or shell block starts (or submits with
    `ray job submit ... --`), with its continuation lines joined."""
    lines = [line.lstrip("# ").rstrip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(program) or f"-- {program} " in line)
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    command = shlex.split(" ".join(line.rstrip("\\") for line in lines[start:end + 1]))
    return command[command.index(program.split()[-1]) + 1:]


def test_the_aws_search_command_asks_for_gpus_carries_the_token_and_mirrors_its_run_to_s3(monkeypatch):
    # ImageNet is on the cluster, not here: its training split's size is what choosing the recipe reads of it
    monkeypatch.setattr("glit_ray.training.training_images", lambda data, space: 1_281_167 - 50_000)
    header = (CLUSTERS / "aws.yaml").read_text().split("cluster_name:")[0]
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in header
    args = build_parser().parse_args(commented_command(header, "python -m glit_ray.search"))
    assert args.mirror.startswith("s3://") and args.address == "auto"
    assert args.gpus_per_worker == 1 and args.gpus_per_actor == 1 and args.supernet_workers == 8
    settings = settings_from_args(args)
    assert settings.space.name == "glit_tiny" and settings.supernet_recipe.preset == "deit"


def test_the_readmes_cluster_commands_parse_and_carry_the_token():
    section = (ROOT / "README.md").read_text().split("## Run on a cluster")[1].split("\n## ")[0]
    submits = re.findall(r"^.*ray job submit.*$", section, flags=re.M)
    assert submits and all(line.startswith("RAY_AUTH_MODE=token ray job submit") for line in submits)
    from glit_ray.train_supernet import build_parser as supernet_parser

    supernet = supernet_parser().parse_args(commented_command(section, "python -m glit_ray.train_supernet"))
    assert supernet.gpus_per_worker == 1 and supernet.workers == 8 and supernet.storage.startswith("s3://")
    search = build_parser().parse_args(commented_command(section, "python -m glit_ray.search"))
    assert search.gpus_per_actor == 1 and search.address == "auto" and search.mirror.startswith("s3://")


def test_the_rayjob_runs_the_search_entrypoint_with_valid_arguments(rayjob, monkeypatch):
    monkeypatch.setattr("glit_ray.training.training_images", lambda data, space: 1_281_167 - 50_000)  # on the cluster
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "glit_ray.search"]
    args = build_parser().parse_args(command[3:])
    assert args.address == "auto" and str(args.out).startswith("/mnt/runs/")
    settings = settings_from_args(args)
    assert settings.space.name == "glit_tiny" and settings.supernet_recipe.preset == "deit"
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    worker, decoder = spec["workerGroupSpecs"]
    [container] = worker["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    [container] = decoder["template"]["spec"]["containers"]  # CPU only: decodes for --ingest ray-data
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and decoder["minReplicas"] == 0
    assert 1 < args.supernet_workers <= worker["maxReplicas"]  # the supernet trains data-parallel, a GPU worker each


def test_the_rayjob_autoscales_from_zero_keeps_work_off_the_head_mounts_data_read_only_and_needs_the_token(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = spec["workerGroupSpecs"]
    assert all(worker["minReplicas"] == worker["replicas"] == 0 for worker in workers)
    for pod in (spec["headGroupSpec"]["template"]["spec"], *(worker["template"]["spec"] for worker in workers)):
        [container] = pod["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert mounts["data"]["readOnly"] is True and claims["data"]["readOnly"] is True
        assert "runs" not in mounts or not mounts["runs"].get("readOnly")


def pruned(value, schema: dict, path: str) -> list[str]:
    """Where `value` breaks a CRD's structural schema: fields the API server would prune, wrong types, values
    outside an enum."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}
    if schema.get("x-kubernetes-int-or-string"):
        expected = (int, str)
    else:
        expected = types.get(schema.get("type"), object)
    if not isinstance(value, expected):
        return [f"{path}: {type(value).__name__}, not {schema.get('type')}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in pruned(item, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    problems = [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
    for key, item in value.items():
        if key in schema.get("properties", {}):
            problems += pruned(item, schema["properties"][key], f"{path}.{key}")
        elif isinstance(schema.get("additionalProperties"), dict):
            problems += pruned(item, schema["additionalProperties"], f"{path}.{key}")
        else:
            problems.append(f"{path}.{key}: not in the schema, pruned")
    return problems


def test_the_rayjob_passes_kuberays_crd_schema_and_the_check_is_real(rayjob):
    crd = yaml.load(gzip.decompress(RAYJOB_CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [schema] = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1"]
    job = {k: v for k, v in rayjob.items() if k != "metadata"}  # the API server's own object metadata
    assert pruned(job, schema, "") == []
    broken = copy.deepcopy(job)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["autoscaling"] = True
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "on"
    assert pruned(broken, schema, "") == [
        ".spec.rayClusterSpec.authOptions.mode: 'on' not in ['disabled', 'token']",
        ".spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: int, not string",
        ".spec.rayClusterSpec.workerGroupSpecs[0].autoscaling: not in the schema, pruned"]


def test_the_image_is_the_pinned_ray_with_torch_for_its_cuda_and_leaves_the_venv_out():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    ray_tag, ray_cuda = re.search(r"^FROM rayproject/ray:([\d.]+)-py311-(cu\d+)$", dockerfile, flags=re.M).groups()
    assert ray_tag == ray.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default,tune,train]>={ray_tag},' in pyproject  # the image's Ray is the one the tests pass on
    assert f"--index-url https://download.pytorch.org/whl/{ray_cuda}" in dockerfile
    for package in ("torch", "torchvision"):
        pinned = re.search(rf'"{package}>=[\d.]+,<=([\d.]+)"', pyproject).group(1)
        assert f'"{package}=={pinned}"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "runs/", ".git/"} <= set(ignored)


def test_the_readmes_kuberay_resume_reapplies_the_same_job_with_resume_added(rayjob):
    """The README's two commands as written: delete the finished RayJob, then apply the file through its `sed`."""
    section = (ROOT / "README.md").read_text().split("## Run on a cluster")[1].split("\n## ")[0]
    assert re.findall(r"^kubectl delete rayjob (\S+)$", section, flags=re.M) == [rayjob["metadata"]["name"]]
    [expression] = re.findall(r"^sed (.+) clusters/kuberay-rayjob\.yaml \| kubectl apply -f -$", section, flags=re.M)
    edited = subprocess.run(["sed", *shlex.split(expression), str(CLUSTERS / "kuberay-rayjob.yaml")],
                            capture_output=True, text=True, check=True).stdout
    resumed = yaml.safe_load(edited)
    first, again = (build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[3:]) for job in (rayjob, resumed))
    assert again.resume and not first.resume and vars(again) == {**vars(first), "resume": True}
    resumed["spec"]["entrypoint"] = rayjob["spec"]["entrypoint"]
    assert resumed == rayjob  # nothing else changed
