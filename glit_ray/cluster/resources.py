"""What each command asks of the cluster, in Ray's terms, decided here and nowhere else.

An autoscaler adds nodes only for what is requested (a pending worker, actor or task that no node
up can hold), so GPU work asks for GPUs instead of looking at the GPUs that happen to be up, and a
worker's CPUs come from the shape of the node type that will host it, never from the cluster's
total divided out: a worker that fits no node waits for ever. The node types are the cluster's
declared ones where Ray shows them (the GCS's cluster config; on KubeRay, the configuration its
autoscaler derives from the RayCluster; on the head node, the configuration the autoscaler's
monitor reads: the launcher's ~/ray_bootstrap_config.yaml), else the nodes up (one machine, a
fixed cluster). A request no node type can hold, or one for more Ray Train workers than they
hold at once, is one line before anything is written; one that waits for the autoscaler says so on
the console.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import ray
import torch

from glit_ray.cluster.ray_workarounds import HEAD_NODE_RESOURCE, autoscaler_config, gcs_node_groups, kuberay_config
from glit_ray.core.errors import UserError

FAKE_GPUS_ENV = "GLIT_RAY_FAKE_GPUS"  # "1": GPUs Ray accounts without devices (its fake test clusters) compute on CPU
CPU_ACTOR_SHARE = 0.9  # of its CPU share, what a CPU-only evaluator asks for: the rest feeds it (the Tune trial)
WAIT_NOTE_S = 30.0     # between two console notes of a request that waits for the autoscaler
WORKER_FIX = "lower --gpus-per-worker or --cpus-per-worker"  # what a refused request of Ray Train workers can change


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or can have: its CPUs and GPUs, and at most how many of them."""
    name: str
    cpus: float
    gpus: float
    max_count: int
    head: bool = False  # the head node's type (a declared worker type, or a node up elsewhere, is not)

    def holds(self, cpus: float, gpus: float) -> int:
        """How many workers asking for (`cpus`, `gpus`) one node of this type holds."""
        fits = [have / want for have, want in ((self.cpus, cpus), (self.gpus, gpus)) if want > 0]
        return math.floor(min(fits) + 1e-9) if fits else 2**31

    def __str__(self) -> str:
        return f"{self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


@dataclass(frozen=True)
class ClusterShape:
    """The node types work can be placed on, where that list came from (for messages), and whether an autoscaler
    declared them (else they are the nodes up: one machine, a fixed cluster)."""
    node_types: tuple[NodeType, ...]
    source: str
    autoscaled: bool = False

    @property
    def default_gpus(self) -> float:
        """GPUs per worker when none are asked for: 1 where the cluster has or can add GPU nodes, else 0."""
        return 1.0 if any(t.gpus > 0 and t.max_count > 0 for t in self.node_types) else 0.0

    def __str__(self) -> str:
        return f"{', '.join(map(str, self.node_types))} ({self.source})"


@dataclass(frozen=True)
class Request:
    """`count` workers (Ray Train workers, evaluator actors, evaluation tasks), each asking for `cpus` CPUs and
    `gpus` GPUs, sized for node type `node_type`; `autoscaled`: an autoscaler can add nodes for it (else the
    nodes up are all there is: one machine, a fixed cluster)."""
    what: str
    count: int
    cpus: float
    gpus: float
    node_type: str
    unit: str = "worker"
    autoscaled: bool = False

    @property
    def resources(self) -> dict[str, float]:
        """Per worker, as Ray Train's `resources_per_worker` takes it."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def __str__(self) -> str:
        units = self.unit if self.count == 1 else f"{self.unit}s"
        return f"{self.what}: {self.count} {units} x ({self.gpus:g} GPU, {self.cpus:g} CPU) on {self.node_type}"


def plan(what: str, count: int, gpus: float | None = None, cpus: float | None = None, unit: str = "worker",
         whole_cpus: bool = True, fix: str = WORKER_FIX,
         shape: ClusterShape | None = None, together: bool = True) -> Request:
    """The request for `count` workers of `what`: `gpus` each (default: 1 where the cluster has or can have GPU
    nodes, else 0) and `cpus` each (default: a GPU worker's share of its node's CPUs; a CPU worker's share of the
    CPUs of the nodes that can hold it, at most one node's), sized for the node type that holds them on the fewest
    nodes. Ray must be initialised. A request no node type holds is a UserError naming the node types and `fix`;
    so is one for more workers than the node types hold at once, where they must run `together` (Ray Train's
    workers start together or not at all; tasks and trials take turns)."""
    if count < 1:
        raise UserError(f"{what}: give at least 1 {unit}")
    shape = shape or cluster_shape()
    gpus = shape.default_gpus if gpus is None else gpus
    if gpus < 0 or (cpus is not None and cpus <= 0):
        raise UserError(f"{what}: GPUs per {unit} must be at least 0 and CPUs above 0; {fix}")
    least_cpus = cpus if cpus is not None else (1.0 if whole_cpus else 0.01)
    hosts = [t for t in shape.node_types if t.max_count > 0 and t.holds(least_cpus, gpus) >= 1]
    if not gpus:  # CPU work leaves GPU nodes to GPU work where it can
        hosts = [t for t in hosts if not t.gpus] or hosts
    if not hosts:
        raise UserError(f"{what} asks for ({gpus:g} GPU, {least_cpus:g} CPU) per {unit}, which no node type holds: "
                        f"{shape}; {fix}")

    def nodes_needed(t: NodeType) -> int:
        return math.ceil(count / t.holds(least_cpus, gpus))

    host = min(hosts, key=lambda t: (nodes_needed(t) > t.max_count, nodes_needed(t), t.gpus, t.cpus) if gpus
               else (nodes_needed(t) > t.max_count, nodes_needed(t), -t.cpus))
    if cpus is None:
        if gpus:
            cpus = host.cpus / math.floor(host.gpus / gpus + 1e-9)
        else:
            cpus = min(sum(t.cpus * t.max_count for t in hosts) / count, host.cpus)
        cpus = max(1, math.floor(cpus)) if whole_cpus else cpus
    request = Request(what, count, cpus, gpus, host.name, unit, shape.autoscaled)
    if together:
        check_together(request, shape, fix)
    return request


def check_together(request: Request, shape: ClusterShape, fix: str = WORKER_FIX) -> None:
    """Refuse `request` where the node types cannot hold all its workers at once: they would wait for ever."""
    most = capacity(request, shape)
    if request.count > most:
        raise UserError(f"{request.what} asks for {request.count} {request.unit}s of ({request.gpus:g} GPU, "
                        f"{request.cpus:g} CPU) at once, and the node types hold {most} at most: {shape}; give at most "
                        f"{most} or {fix}")


def evaluators(actors: int | None, gpus: float | None, gpus_after_training: float = 0.0,
               shape: ClusterShape | None = None) -> Request:
    """The search's evaluator actors: `gpus` each (default as `plan`'s) and one CPU to drive a GPU, or on CPU
    CPU_ACTOR_SHARE of their share of the CPUs. `actors` defaults to one per GPU up once the supernet is trained
    (`gpus_after_training`: the GPUs its workers brought up), else 2."""
    shape = shape or cluster_shape()
    gpus = shape.default_gpus if gpus is None else gpus
    if actors is None:
        gpus_up = max(ray.cluster_resources().get("GPU", 0.0), gpus_after_training)
        actors = max(1, math.floor(gpus_up / gpus + 1e-9)) if gpus else 2
    request = plan("evaluators", actors, gpus, 1.0 if gpus else None, unit="actor", whole_cpus=False,
                   fix="lower --gpus-per-actor", shape=shape)
    return request if gpus else replace(request, cpus=round(request.cpus * CPU_ACTOR_SHARE, 3))


def cluster_shape() -> ClusterShape:
    """The cluster's node types: declared (GCS cluster config, or this head's autoscaler configuration), else those
    of the nodes up. Ray must be initialised."""
    declared = _gcs_node_types()
    if declared:
        return ClusterShape(declared, "the cluster's node types", autoscaled=True)
    config = kuberay_config() or autoscaler_config()
    if config is not None:
        head = next(n["Resources"] for n in ray.nodes() if n["Alive"] and HEAD_NODE_RESOURCE in n["Resources"])
        return ClusterShape(config_node_types(config, head), "the autoscaler's node types", autoscaled=True)
    return ClusterShape(nodes_up(), "the nodes up; no autoscaler configuration is visible from here")


def _gcs_node_types() -> tuple[NodeType, ...]:
    """The node groups an autoscaler reported to the GCS (KubeRay's v2 autoscaler does), if any."""
    return tuple(NodeType(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                          2**31 if g.max_count < 0 else g.max_count) for g in gcs_node_groups())


def config_node_types(config: dict, head: dict[str, float]) -> tuple[NodeType, ...]:
    """The node types of a cluster launcher configuration (`available_node_types`): the head one of its type, the
    others up to their `max_workers` and the cluster's (its cap on all worker nodes together). The head's CPUs and
    GPUs are `head`'s (the running head's resources) where its type leaves them out (Ray detects them)."""
    head_name, total = config["head_node_type"], config.get("max_workers")
    types = []
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources") or {}
        if name == head_name:
            resources = {"CPU": head.get("CPU", 0), "GPU": head.get("GPU", 0), **resources}
            count = 1
        else:
            count = node_type.get("max_workers", total or 0)
            if total is not None:
                count = min(count, total)
        types.append(NodeType(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), count,
                              head=name == head_name))
    return tuple(types)


def nodes_up() -> tuple[NodeType, ...]:
    """The nodes up, one type per (CPUs, GPUs) shape: "head" for the head's, "N CPU + M GPU" for the others."""
    shapes: Counter = Counter()
    for node in ray.nodes():
        if node["Alive"]:
            r = node["Resources"]
            name = "head" if HEAD_NODE_RESOURCE in r else f"{r.get('CPU', 0):g} CPU + {r.get('GPU', 0):g} GPU"
            shapes[name, float(r.get("CPU", 0)), float(r.get("GPU", 0))] += 1
    return tuple(NodeType(name, cpus, gpus, count, head=name == "head")
                 for (name, cpus, gpus), count in sorted(shapes.items()))


def capacity(request: Request, shape: ClusterShape) -> int:
    """The most workers of `request` the cluster's node types can hold at once."""
    return sum(min(t.max_count, 2**20) * t.holds(request.cpus, request.gpus) for t in shape.node_types)


def room(request: Request) -> int:
    """How many of `request`'s workers the nodes up could hold if they were idle."""
    return sum(NodeType("", n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0), 1)
               .holds(request.cpus, request.gpus) for n in ray.nodes() if n["Alive"])


@contextmanager
def waiting_note(request: Request, say) -> Iterator[None]:
    """While the block runs and the nodes up have no room for all of `request`, `say` what it waits for and how
    long so far (every WAIT_NOTE_S), and when the room is there: the console is never silent while an autoscaler
    brings nodes up, or while other work holds the nodes of a cluster without one."""
    stop = threading.Event()

    def watch() -> None:
        started, said = time.monotonic(), None
        while True:
            missing = request.count - min(room(request), request.count)
            waited = time.monotonic() - started
            if not missing:
                if said is not None:
                    say(f"{request.what}: room for all {request.count} {request.unit}(s) after {waited:.0f} s")
                return
            if said is None or time.monotonic() - said >= WAIT_NOTE_S:
                waiting = "the autoscaler to add room" if request.autoscaled else "other work to leave room"
                say(f"{request.what}: waiting for {waiting} for {missing} more {request.unit}(s) of "
                    f"({request.gpus:g} GPU, {request.cpus:g} CPU), {waited:.0f} s so far")
                said = time.monotonic()
            if stop.wait(1.0):
                return

    watcher = threading.Thread(target=watch, name="glit-ray-waiting-note", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=5)


def placed_device(role: str) -> torch.device:
    """The device a process Ray placed computes on: CUDA where it sees a device, else the CPU. A process Ray gave a
    GPU that sees no CUDA device is an error (it would compute on the CPU while the cluster holds its GPU), unless
    FAKE_GPUS_ENV is "1" in its environment: Ray's fake multi-node test clusters account GPUs that do not exist."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpus = ray.get_gpu_ids()
    if gpus and os.environ.get(FAKE_GPUS_ENV) != "1":
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"the {role} on node {ray.util.get_node_ip_address()} was given GPU {','.join(map(str, gpus))} "
                        f"by Ray but torch ({torch.__version__}, {build}) sees no CUDA device "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): the node's NVIDIA "
                        "driver is missing or older than the image's CUDA, or its container runs without the NVIDIA "
                        "runtime; fix the node image (on a test cluster of fake GPUs, set "
                        f"{FAKE_GPUS_ENV}=1)")
    return torch.device("cpu")

