"""The cluster files: aws.yaml passes the launcher's schema and is locked down, the RayJob passes KubeRay's CRD schema,
the image is the pinned stack, and the commands they and the README's cluster section run parse."""
import ast
import copy
import gzip
import json
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
    monkeypatch.setattr("glit_ray.training.flags.training_images", lambda data, space: 1_281_167 - 50_000)
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
    monkeypatch.setattr("glit_ray.training.flags.training_images", lambda data, space: 1_281_167 - 50_000)  # on the cluster
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


# --- what the cluster needs in the account: clusters/aws-bootstrap.yaml's roles against the calls the files make ---

ACCOUNT = "123456789012"  # any account: the template's ARNs are built from AWS::AccountId
# Every AWS call made with a node's role, who makes it and why. Ray 2.60's AWS node provider on the head (it reads
# ~/ray_bootstrap_config.yaml, whose subnets, security groups and key pair `ray up` chose from your machine, so it
# creates none of them) and what the nodes run; `ray up` and `ray down` use your own credentials.
CALLS = {
    ("head", "ec2:RunInstances"): "the autoscaler launches each worker node type (AWSNodeProvider._create_node)",
    ("head", "ec2:CreateTags"): "Ray tags workers at launch (TagSpecifications) and later (set_node_tags)",
    ("head", "ec2:TerminateInstances"): "idle workers end (terminate_nodes; cache_stopped_nodes: false, none stop)",
    ("head", "ec2:DescribeInstances"): "the autoscaler lists the cluster's nodes (non_terminated_nodes, _get_node)",
    ("head", "iam:PassRole"): "workers launch with their IamInstanceProfile",
    ("head", "ssm:GetParameters"): "EC2 resolves a worker's `resolve:ssm:` ImageId with the launcher's rights",
    ("head", "iam:CreateServiceLinkedRole"): "the first spot launch in an account creates EC2's spot role",
    **{(role, action): "initialization_commands: aws ecr get-login-password | docker login, then docker pull"
       for role in ("head", "worker") for action in ("ecr:GetAuthorizationToken", "ecr:BatchGetImage",
                                                     "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability")},
    **{(role, "s3:ListBucket"): "pyarrow opens an s3:// URI with a HeadBucket; a --resume pulls the mirror by listing"
       for role in ("head", "worker")},
    **{(role, action): "--mirror (the head's driver) and --storage / URI/supernet checkpoints (the GPU workers)"
       for role in ("head", "worker") for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                                     "s3:AbortMultipartUpload")},
}
NO_RESOURCE_LEVEL = {"ec2:DescribeInstances", "ecr:GetAuthorizationToken"}  # IAM takes only "*" for these


@pytest.fixture
def bootstrap() -> dict:
    return yaml.safe_load((CLUSTERS / "aws-bootstrap.yaml").read_text())


def cluster_section() -> str:
    return (ROOT / "README.md").read_text().split("## Run on a cluster")[1].split("\n## ")[0]


def deploy_command(text: str) -> dict:
    """The options of the `aws cloudformation deploy` command in `text` (a comment or shell block), with
    --parameter-overrides as a dict."""
    args = commented_command(text, "aws cloudformation deploy")
    options, key = {}, None
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:]
            options[key] = True
        elif key == "parameter-overrides":
            options[key] = {**(options[key] if isinstance(options[key], dict) else {}), **dict([arg.split("=", 1)])}
        else:
            options[key] = arg
    return options


def resolved(value, template: dict, parameters: dict, region: str):
    """`value` with CloudFormation's intrinsic functions worked out as a deploy in `region` with `parameters` would;
    one this does not know fails the test rather than passing unread."""
    def name(logical: str) -> str:  # what Ref gives: a parameter's value, a named resource's name
        if logical in parameters:
            return parameters[logical]
        pseudo = {"AWS::Region": region, "AWS::AccountId": ACCOUNT, "AWS::Partition": "aws"}
        if logical in pseudo:
            return pseudo[logical]
        properties = template["Resources"][logical]["Properties"]
        key = {"AWS::IAM::Role": "RoleName", "AWS::IAM::InstanceProfile": "InstanceProfileName",
               "AWS::ECR::Repository": "RepositoryName"}[template["Resources"][logical]["Type"]]
        return resolved(properties[key], template, parameters, region)

    def attribute(logical: str, attr: str) -> str:
        assert template["Resources"][logical]["Type"] == "AWS::IAM::Role" and attr == "Arn", (logical, attr)
        return f"arn:aws:iam::{ACCOUNT}:role/{name(logical)}"

    if isinstance(value, list):
        return [resolved(v, template, parameters, region) for v in value]
    if not isinstance(value, dict):
        return value
    if any(k == "Ref" or k.startswith("Fn::") for k in value):
        [(key, arg)] = value.items()
        if key == "Ref":
            return name(arg)
        if key == "Fn::GetAtt":
            return attribute(*arg)
        if key == "Fn::Sub":
            return re.sub(r"\$\{([\w:]+)(?:\.(\w+))?\}",
                          lambda m: attribute(m[1], m[2]) if m[2] else str(name(m[1])), arg)
        raise AssertionError(f"{key}: an intrinsic function the test does not resolve")
    return {k: resolved(v, template, parameters, region) for k, v in value.items()}


def deployed(template: dict, aws: dict) -> dict:
    """The template's resources as the README's `aws cloudformation deploy` creates them (its parameter overrides,
    the template's defaults for the rest), in aws.yaml's region."""
    overrides = deploy_command(cluster_section())["parameter-overrides"]
    parameters = {}
    for key, spec in template["Parameters"].items():
        value = overrides.get(key, spec.get("Default"))
        assert value is not None, f"the README's deploy gives no {key}, which has no default"
        parameters[key] = value.split(",") if spec["Type"] == "CommaDelimitedList" else value
    return resolved(template["Resources"], template, parameters, aws["provider"]["region"])


def role_statements(resources: dict) -> dict[str, list[dict]]:
    """Each role's policy statements ("head", "worker"), from its own Policies and the AWS::IAM::Policy resources
    attached to it, keyed by the role names' last word."""
    roles = {}
    for logical, resource in resources.items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        name = resource["Properties"]["RoleName"]
        statements = [s for p in resource["Properties"].get("Policies", []) for s in p["PolicyDocument"]["Statement"]]
        statements += [s for r in resources.values() if r["Type"] == "AWS::IAM::Policy"
                       and name in r["Properties"]["Roles"] for s in r["Properties"]["PolicyDocument"]["Statement"]]
        roles[name.rsplit("-", 1)[-1]] = statements
    return roles


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def arn_matches(pattern: str, arn: str) -> bool:
    """IAM's matching of an ARN against a pattern: `*` any run of characters, `?` one."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), arn) is not None


def allowed(statements: list[dict], action: str, resource: str, context: dict | None = None) -> bool:
    """Whether an Allow statement grants `action` on `resource` to a request carrying the condition keys `context`:
    actions compared case-insensitively, Resource / NotResource by IAM's wildcards, StringEquals and StringLike
    conditions, a condition on a key the request lacks failing (the template uses no Deny)."""
    context = context or {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        if action.lower() not in (a.lower() for a in as_list(statement["Action"])):
            continue
        if "NotResource" in statement:
            if any(arn_matches(p, resource) for p in as_list(statement["NotResource"])):
                continue
        elif not any(arn_matches(p, resource) for p in as_list(statement["Resource"])):
            continue
        conditions = []
        for operator, keys in statement.get("Condition", {}).items():
            match = {"StringEquals": lambda want, have: want == have, "StringLike": arn_matches}[operator]
            conditions += [key in context and any(match(w, context[key]) for w in as_list(want))
                           for key, want in keys.items()]
        if all(conditions):
            return True
    return False


def cluster_calls(aws: dict, resources: dict) -> list[tuple[str, str, str, dict]]:
    """(role, action, resource ARN, condition keys) of every call CALLS names, for what the files hold: each worker
    node type launched, tagged and ended by the head, the image pulled by every node, each s3:// URI of aws.yaml and
    the README's cluster section read and written by every node."""
    region, name = aws["provider"]["region"], aws["cluster_name"]
    head_type = aws["available_node_types"][aws["head_node_type"]]
    workers = [t for key, t in aws["available_node_types"].items() if key != aws["head_node_type"]]
    instance = f"arn:aws:ec2:{region}:{ACCOUNT}:instance/i-0123456789abcdef0"
    calls = []
    image_region, repository = re.fullmatch(r"[^.]+\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/([^:]+):[^:]+",
                                            aws["docker"]["image"]).groups()
    assert image_region == region
    assert any("aws ecr get-login-password" in c for c in aws["initialization_commands"])
    for role in ("head", "worker"):
        calls.append((role, "ecr:GetAuthorizationToken", "*", {}))
        calls += [(role, action, f"arn:aws:ecr:{region}:{ACCOUNT}:repository/{repository}", {})
                  for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability")]
    profiles = {r["Properties"]["InstanceProfileName"]: r["Properties"]["Roles"] for r in resources.values()
                if r["Type"] == "AWS::IAM::InstanceProfile"}
    for worker in workers:
        config = worker["node_config"]
        image = config["ImageId"]
        assert image.startswith("resolve:ssm:/")
        calls.append(("head", "ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{image[len('resolve:ssm:'):]}", {}))
        calls.append(("head", "ec2:RunInstances", instance, {"ec2:InstanceType": config["InstanceType"]}))
        others = ["image/ami-0123456789abcdef0", "subnet/subnet-0123", "security-group/sg-0123",
                  "network-interface/eni-0123", "volume/vol-0123", f"key-pair/ray-autoscaler_{region}"]
        if config.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
            others.append("spot-instances-request/sir-0123")
            calls.append(("head", "iam:CreateServiceLinkedRole", f"arn:aws:iam::{ACCOUNT}:role/aws-service-role/"
                          "spot.amazonaws.com/AWSServiceRoleForEC2Spot", {"iam:AWSServiceName": "spot.amazonaws.com"}))
        calls += [("head", "ec2:RunInstances", f"arn:aws:ec2:{region}:{'' if o.startswith('image') else ACCOUNT}:{o}",
                   {}) for o in others]
        [worker_role] = profiles[config["IamInstanceProfile"]["Name"]]
        calls.append(("head", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{worker_role}",
                      {"iam:PassedToService": "ec2.amazonaws.com"}))
    assert aws["provider"]["cache_stopped_nodes"] is False  # workers end; StopInstances/StartInstances are not needed
    calls.append(("head", "ec2:CreateTags", instance, {"ec2:CreateAction": "RunInstances"}))
    calls += [("head", action, instance, {"ec2:ResourceTag/ray-cluster-name": name})
              for action in ("ec2:CreateTags", "ec2:TerminateInstances")]
    calls.append(("head", "ec2:DescribeInstances", "*", {}))
    uris = re.findall(r"s3://[^\s`'\"]+", (CLUSTERS / "aws.yaml").read_text() + cluster_section())
    assert len(uris) >= 3
    for uri in uris:
        bucket, _, key = uri.rstrip(".,;:)").removeprefix("s3://").partition("/")
        for role in ("head", "worker"):
            calls.append((role, "s3:ListBucket", f"arn:aws:s3:::{bucket}", {}))
            calls += [(role, action, f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/tune/experiment_state.json", {})
                      for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")]
    assert head_type["node_config"]["IamInstanceProfile"]["Name"] in profiles
    return calls


def test_aws_yaml_names_the_bootstraps_instance_profiles_so_the_launcher_makes_no_role(aws, bootstrap):
    """The head's profile named in its node type: Ray 2.60's `ray up` then creates no `ray-autoscaler-v1` role with
    AmazonEC2FullAccess and AmazonS3FullAccess; the workers' profile named in every worker type."""
    resources = deployed(bootstrap, aws)
    profiles = {r["Properties"]["InstanceProfileName"]: r["Properties"]["Roles"]
                for r in resources.values() if r["Type"] == "AWS::IAM::InstanceProfile"}
    roles = {r["Properties"]["RoleName"] for r in resources.values() if r["Type"] == "AWS::IAM::Role"}
    types = aws["available_node_types"]
    head = types.pop(aws["head_node_type"])
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "glit-ray-head"} and profiles["glit-ray-head"] == [
        "glit-ray-head"]
    for node_type in types.values():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "glit-ray-worker"}
    assert profiles["glit-ray-worker"] == ["glit-ray-worker"] and roles == {"glit-ray-head", "glit-ray-worker"}

    # Ray 2.60's `ray up` (aws/config.py, read rather than imported: it needs boto3): its IAM step returns the
    # config untouched, before any IAM call, when the head's node type names a profile
    source = (Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "config.py").read_text()
    [step] = [f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef) and f.name == "_configure_iam_role"]
    first_if = next(i for i, node in enumerate(step.body) if isinstance(node, ast.If))
    guard = step.body[first_if]
    assert ast.unparse(guard.test) == "'IamInstanceProfile' in head_node_config"
    assert ast.unparse(guard.body[-1]) == "return config"
    before = "\n".join(ast.unparse(node) for node in step.body[:first_if])
    assert "_client" not in before and "_resource" not in before and "create_" not in before
    assert "ray-autoscaler" not in before and "ray-autoscaler" not in ast.unparse(guard)


def test_every_aws_call_the_cluster_files_make_is_allowed_to_the_role_that_makes_it(aws, bootstrap):
    resources = deployed(bootstrap, aws)
    statements = role_statements(resources)
    calls = cluster_calls(aws, resources)
    assert {(role, action) for role, action, _, _ in calls} == set(CALLS)  # the table names every call, and why
    refused = [call for call in calls if not allowed(statements[call[0]], *call[1:])]
    assert refused == []


def test_the_bootstrap_grants_no_action_the_cluster_does_not_use_and_no_full_access(aws, bootstrap):
    """Least privilege: each role's actions are exactly those CALLS gives it; no wildcard action, no NotAction, no
    AWS managed policy; "*" only for the actions IAM takes no resource for; PassRole on the worker role alone."""
    resources = deployed(bootstrap, aws)
    for role, statements in role_statements(resources).items():
        actions = {a for s in statements for a in as_list(s["Action"])}
        assert actions == {action for who, action in CALLS if who == role}, role
        assert not any("*" in a for a in actions) and not any("NotAction" in s for s in statements)
        for statement in statements:
            if "*" in as_list(statement.get("Resource", [])):
                assert set(as_list(statement["Action"])) <= NO_RESOURCE_LEVEL
            if "iam:PassRole" in as_list(statement["Action"]):
                assert statement["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/glit-ray-worker"
    for resource in resources.values():
        assert "ManagedPolicyArns" not in resource.get("Properties", {})
    text = (CLUSTERS / "aws-bootstrap.yaml").read_text()
    assert "FullAccess" not in text and "AdministratorAccess" not in text


@pytest.mark.parametrize("role, action, resource, context", [
    ("head", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/glit-ray-head", {"iam:PassedToService": "ec2.amazonaws.com"}),
    ("head", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", {"iam:PassedToService": "ec2.amazonaws.com"}),
    ("head", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/glit-ray-worker", {"iam:PassedToService": "lambda.amazonaws.com"}),
    ("head", "ec2:RunInstances", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1", {"ec2:InstanceType": "p5.48xlarge"}),
    ("head", "ec2:TerminateInstances", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1", {}),  # untagged
    ("head", "ec2:TerminateInstances", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1",
     {"ec2:ResourceTag/ray-cluster-name": "another-cluster"}),
    ("head", "ec2:CreateTags", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1", {"ec2:CreateAction": "CreateTags"}),
    ("head", "ssm:GetParameters", f"arn:aws:ssm:us-west-2:{ACCOUNT}:parameter/prod/db-password", {}),
    ("head", "s3:GetObject", "arn:aws:s3:::YOUR-BUCKET/other/file", {}),
    ("head", "s3:PutObject", "arn:aws:s3:::another-bucket/glit_ray/file", {}),
    ("head", "ecr:BatchGetImage", f"arn:aws:ecr:us-west-2:{ACCOUNT}:repository/another", {}),
    ("worker", "ec2:RunInstances", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1", {"ec2:InstanceType": "g5.2xlarge"}),
    ("worker", "ec2:TerminateInstances", f"arn:aws:ec2:us-west-2:{ACCOUNT}:instance/i-1",
     {"ec2:ResourceTag/ray-cluster-name": "glit-ray"}),
    ("worker", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/glit-ray-worker", {"iam:PassedToService": "ec2.amazonaws.com"}),
    ("worker", "s3:DeleteObject", "arn:aws:s3:::YOUR-BUCKET/glit_ray_other/file", {}),
])
def test_the_bootstrap_refuses_what_the_cluster_does_not_do(aws, bootstrap, role, action, resource, context):
    """The check is real: other roles, instance types, clusters, parameters, prefixes and repositories are refused."""
    assert not allowed(role_statements(deployed(bootstrap, aws))[role], action, resource, context)


def test_the_first_step_is_the_bootstrap_an_idempotent_deploy_that_aws_yaml_and_the_readme_agree_on(aws, bootstrap):
    """`aws cloudformation deploy` with --no-fail-on-empty-changeset: a second run with nothing to change exits 0
    ("No changes to deploy"); the hand-made IAM steps (put-role-policy on ray-autoscaler-v1) are gone."""
    section = cluster_section()
    aws_block = section.split("**AWS**")[1].split("```bash\n")[1].split("```")[0]
    assert aws_block.startswith("aws cloudformation deploy ")
    assert aws_block.index("aws cloudformation deploy") < aws_block.index("ray up clusters/aws.yaml")
    header = (CLUSTERS / "aws.yaml").read_text().split("cluster_name:")[0]
    readme, file = deploy_command(section), deploy_command(header)
    assert readme == file
    assert readme["template-file"] == "clusters/aws-bootstrap.yaml" and readme["capabilities"] == "CAPABILITY_NAMED_IAM"
    assert readme["no-fail-on-empty-changeset"] is True and readme["region"] == aws["provider"]["region"]
    assert set(readme["parameter-overrides"]) <= set(bootstrap["Parameters"])
    assert "No changes to deploy" in section
    resources = deployed(bootstrap, aws)
    assert resources["ImageRepository"]["DeletionPolicy"] == "Retain"  # deleting the stack keeps the images
    assert [t["node_config"]["InstanceType"] for k, t in aws["available_node_types"].items()
            if k != aws["head_node_type"]] == bootstrap["Parameters"]["WorkerInstanceTypes"]["Default"].split(",")
    assert bootstrap["Parameters"]["ClusterName"]["Default"] == aws["cluster_name"]
    for text in (header, section):
        assert "put-role-policy" not in text and "create-repository" not in text


# --- where work runs and what it may use: the AWS head, the KubeRay pods ---

def test_the_aws_head_offers_no_cpu_to_work_as_the_launcher_starts_it(aws, monkeypatch):
    """The launcher exports the head type's `resources` as RAY_OVERRIDE_RESOURCES for `ray start`, and Ray takes
    them over `--num-cpus`: CPU 0 in the type is what keeps decode tasks and trials off the head."""
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    command = shlex.split(aws["head_start_ray_commands"][-1])
    assert "--num-cpus=0" in command
    for resources, cpus in ((head["resources"], 0), ({"CPU": 8, "GPU": 0}, 8)):  # the file's, and the old one
        monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps(resources))
        assert ResourceAndLabelSpec(num_cpus=0).resolve(is_head=True, node_ip_address="127.0.0.1").num_cpus == cpus


def quantity(value: str) -> float:
    """A Kubernetes quantity ("7", "500m", "28Gi", bytes) as a number (CPUs, bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|Ti)?", str(value)).groups()
    return float(number) * units.get(unit, 1)


def pods(rayjob: dict) -> dict[str, tuple[dict, dict]]:
    """Each group's (rayStartParams, pod spec): the head's and every worker group's."""
    spec = rayjob["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    return {"head": (head["rayStartParams"], head["template"]["spec"]),
            **{g["groupName"]: (g["rayStartParams"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]}}


# The nodes the file's comments size the worker pods for, (vCPUs, GiB). A node offers pods less than that: the
# kubelet's and the system's reservations, the eviction threshold, DaemonSets (on EKS, about 0.1 CPU and 1-2 GiB
# before DaemonSets); a pod leaves at least a CPU and 4 GiB of it.
NODES = {"gpu": (8, 32), "cpu": (16, 32)}


def test_the_rayjob_worker_pods_request_less_than_their_nodes_have(rayjob):
    text = (CLUSTERS / "kuberay-rayjob.yaml").read_text()
    for group, (cpus, gib) in NODES.items():
        assert f"{cpus}-vCPU / {gib}-GiB" in text
        [container] = pods(rayjob)[group][1]["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits  # what Ray is told (limits) is what the scheduler reserves
        assert quantity(requests["cpu"]) <= cpus - 1 and quantity(requests["memory"]) <= (gib - 4) * 2**30, group


def test_each_rayjob_pod_keeps_its_object_store_in_its_shared_memory(rayjob):
    """Ray puts its object store in /dev/shm only if it fits (else it goes to disk): every pod, the head included,
    has a memory-backed /dev/shm and an object store set below its size, itself below the pod's memory."""
    for group, (params, pod) in pods(rayjob).items():
        [container] = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        [shm] = [v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory", group
        size = quantity(shm["emptyDir"]["sizeLimit"])
        assert 0 < int(params["object-store-memory"]) <= size < quantity(container["resources"]["limits"]["memory"])


def test_rayjob_pods_make_a_runs_volume_writable_by_the_images_user(rayjob):
    """The image runs as `ray`, uid 1000: fsGroup 1000 on every pod gives it a root-owned block volume."""
    assert "--chown=ray:users" in (CLUSTERS / "Dockerfile").read_text()
    for group, (_, pod) in pods(rayjob).items():
        assert pod["securityContext"]["fsGroup"] == 1000, group


# --- the README's ways in: job logs, the dashboard's token, KubeRay's port-forward and Secret ---

def test_the_readmes_ray_job_commands_name_the_cluster_and_carry_the_token():
    lines = re.findall(r"^.*\bray job (?:logs|status|stop|list|submit)\b.*$", cluster_section(), flags=re.M)
    assert any(" ray job logs " in line for line in lines)
    for line in lines:
        assert "--address http://127.0.0.1:8265" in line and "RAY_AUTH_MODE=token ray job" in line, line


def test_the_readme_says_how_to_give_the_dashboard_the_token_as_ray_260s_dashboard_asks_for_it():
    section = cluster_section()
    assert "ray get-auth-token" in section and '"Authentication Token" field' in section
    dashboard = Path(ray.__file__).parent / "dashboard" / "client" / "build" / "static" / "js"
    assert any('"Authentication Token"' in p.read_text(errors="ignore") for p in dashboard.glob("main.*.js"))


def test_the_readme_reaches_the_rayjobs_dashboard_with_kuberays_service_and_secret(rayjob):
    """KubeRay 1.7 names the Secret after the RayCluster (the RayJob's status.rayClusterName), key auth_token, and
    gives a RayJob the Service NAME-head-svc."""
    section, name = cluster_section(), rayjob["metadata"]["name"]
    assert f"kubectl port-forward service/{name}-head-svc 8265:8265" in section
    assert f"CLUSTER=$(kubectl get rayjob {name} -o jsonpath='{{.status.rayClusterName}}')" in section
    assert "kubectl get secret \"$CLUSTER\" -o jsonpath='{.data.auth_token}' | base64 -d" in section


# --- the commands of the files, planned on the files' own node shapes ---

def test_the_cluster_files_commands_fit_their_own_node_shapes(aws, rayjob, monkeypatch):
    """What each command the files run asks for (glit_ray.cluster.resources, as the commands plan it on a fresh cluster,
    no GPU up) fits a worker node type of the file it runs on: no request waits for a node that never comes."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from glit_ray.cluster import resources
    from glit_ray.train_supernet import build_parser as supernet_parser

    monkeypatch.setattr(resources.ray, "cluster_resources", lambda: {})  # nothing up yet
    aws_shape = resources.ClusterShape(resources.config_node_types(aws, {}), "aws.yaml", autoscaled=True)
    spec = rayjob["spec"]["rayClusterSpec"]
    kuberay = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "glit", "namespace": "ml"}, "spec": spec})
    kuberay_shape = resources.ClusterShape(resources.config_node_types(kuberay, {}), "kuberay", autoscaled=True)
    header = (CLUSTERS / "aws.yaml").read_text().split("cluster_name:")[0]
    searches = [(build_parser().parse_args(commented_command(header, "python -m glit_ray.search")), aws_shape),
                (build_parser().parse_args(commented_command(cluster_section(), "python -m glit_ray.search")), aws_shape),
                (build_parser().parse_args(shlex.split(rayjob["spec"]["entrypoint"])[3:]), kuberay_shape)]
    requests = []
    for args, shape in searches:
        trainers = None if args.supernet else resources.plan("supernet", args.supernet_workers, args.gpus_per_worker,
                                                             args.cpus_per_worker, shape=shape)
        requests += [trainers] if trainers else []
        requests.append(resources.evaluators(args.actors, args.gpus_per_actor,
                                             trainers.count * trainers.gpus if trainers else 0, shape))
    supernet = supernet_parser().parse_args(commented_command(cluster_section(), "python -m glit_ray.train_supernet"))
    requests.append(resources.plan("supernet", supernet.workers, supernet.gpus_per_worker, supernet.cpus_per_worker,
                                   shape=aws_shape))
    assert [str(r) for r in requests] == [
        "supernet: 8 workers x (1 GPU, 12 CPU) on gpu_a100x8", "evaluators: 8 actors x (1 GPU, 1 CPU) on gpu_a100x8",
        "evaluators: 8 actors x (1 GPU, 1 CPU) on gpu_a100x8",
        "supernet: 4 workers x (1 GPU, 7 CPU) on gpu", "evaluators: 4 actors x (1 GPU, 1 CPU) on gpu",
        "supernet: 8 workers x (1 GPU, 12 CPU) on gpu_a100x8"]
