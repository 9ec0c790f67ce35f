import copy
import os
import random
import subprocess
import sys

import pytest
import yaml

from glit_ray.models.space import SearchSpace

# Ray Train starts a preemption watcher (one more Ray worker process) per run; no test preempts a node
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# its controller polls the workers every 2 s; a test run is seconds long, and every poll ends a wait on it
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def micro() -> SearchSpace:
    return SearchSpace.load("glit_micro")


@pytest.fixture(scope="session")
def tiny() -> SearchSpace:
    return SearchSpace.load("glit_tiny")


@pytest.fixture(scope="session")
def micro_latency_table(micro) -> dict:
    """A latency table of glit_micro for 10 classes, assembled by `assemble_table` from made-up part times (a block's
    0.05 ms per MFLOP plus 5 us): the search's bookkeeping, not the table's timing (tests/test_onnx_latency.py)."""
    from glit_ray.models.cost import block_cost
    from glit_ray.models.latency_table import (HEAD, NETWORK, OVERHEAD, STEM, Runtime, assemble_table,
                                               block_options)

    def in_sequence(block):  # `depth` copies, one call
        return micro.depth * (0.05 * block_cost(micro, block).flops / 1e6 + 0.005) + 0.01

    parts = {OVERHEAD: 0.01, STEM: 0.03, HEAD: 0.02, **{str(b): in_sequence(b) for b in block_options(micro)}}
    for g in micro.global_heads:
        parts[NETWORK.format(g)] = 0.054 + in_sequence(micro.default_block(g)) - 0.01
    return assemble_table(micro, Runtime("torch"), parts, num_classes=10)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def micro_dict(micro) -> dict:
    """A fresh, editable copy of the micro space's YAML mapping."""
    return copy.deepcopy(micro.to_dict())


@pytest.fixture
def write_space(tmp_path):
    """Write a space mapping to a YAML file and return its path."""

    def write(data, name="space.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
        return path

    return write


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session: a head node sized like CI (2 CPUs).

    A `ray.cluster_utils.Cluster`, so that multi-node tests can add worker nodes to it (and
    remove them) instead of starting a second Ray.
    """
    import ray
    from ray.cluster_utils import Cluster

    from glit_ray.cluster import ray_workarounds

    ray_workarounds.apply()  # what the commands apply before Ray starts, for the runs tests start in this process

    # with Ray's dashboard: Ray Train's placement group cleaner asks the state API it serves whether a run's controller
    # is gone, and without it never gives back the CPUs of a run killed mid-way
    # its workers compute on one thread each (Ray would give a 2-CPU Ray Train worker 2): the session's search trains
    # beside the tests that need no Ray, and an OpenMP team of 2 on 2 busy cores stalls at every barrier (the search's
    # first supernet epoch ran at 27 images/s beside them, 17 times slower than alone; 396 with one thread)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def cluster_env(ray_cluster, session_search) -> dict:
    """Environment for a child `python -m glit_ray...`: it joins the session's cluster as a second driver, as a
    command joins a running cluster (`--address auto`), instead of starting a Ray of its own. Killing the child
    ends its job, and Ray then kills the job's actors (its Ray Train and Tune workers)."""
    search_finished(session_search)
    return joining(ray_cluster)


def joining(cluster) -> dict:
    """This process's environment, with RAY_ADDRESS naming `cluster`."""
    return {**os.environ, "RAY_ADDRESS": cluster.address}


@pytest.fixture(scope="session")
def ray_session(ray_cluster, session_search):
    import ray

    search_finished(session_search)
    return ray


@pytest.fixture
def shipped_by_value(request):
    """Ray's workers cannot import a test module: what the requesting test's module defines (a test subclass of an
    actor, a wrapped train loop) goes to them by value while the test runs."""
    import ray

    ray.cloudpickle.register_pickle_by_value(request.module)
    yield
    ray.cloudpickle.unregister_pickle_by_value(request.module)


@pytest.fixture(scope="session")
def folder224(tmp_path_factory):
    """A class-sorted ImageNet-layout folder of 256-px JPEGs: 10 classes x 40 train (+ 10 val) images."""
    from glit_ray.synthetic import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("folder224"), classes=10, train_per_class=40, val_per_class=10)


@pytest.fixture
def cli_error(capsys):
    """Run an entry point's `main(argv)` as `python -m` does: it must end in one `error:` line on stderr and exit
    code 2. Returns the line."""
    from glit_ray.core.cli import run

    def call(main, argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run(main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    return call


# the high-level search several tests read: it trains its own supernet (2 fair epochs, 8 path-epochs: the verdict the
# search checks passes at 46 % median probe against 13 % chance, where 2 uniform epochs left the probes too near
# chance, 2026-12-04; 5 uniform ones took as long), then runs 4 generations of 8 on one
# evaluator (an evaluator's process costs more CPU than its share of 32 digits candidates; the tests of scoring on
# several actors and nodes have their own)
HIGH_SEARCH = ["--level", "high", "--supernet-epochs", "2", "--population", "8", "--generations", "4", "--mutations", "4",
               "--crossovers", "4", "--topk", "4", "--heldout-images", "128", "--actors", "1"]


# Fixtures that start Ray (the session's cluster, or the session's search as a process): a test using any is not quick.
RAY_FIXTURES = {"ray_cluster", "high_search_process", "autoscaling_cluster"}


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts Ray or a run on it (set from the test's fixtures)")
    config.addinivalue_line("markers", "subprocess: starts a Python process (a command as a user runs it)")
    config.addinivalue_line("markers", "onnx: exports through torch's dynamo exporter or runs ONNX Runtime (seconds each)")


def pytest_collection_modifyitems(items):
    """Marks the tests that use Ray `ray`, so that `make test-quick` (`-m "not ray and not subprocess"`) leaves them
    out; the tests that need no Ray run first, beside the session's search (`session_search`), which starts with them."""
    uses_ray = {item: bool(RAY_FIXTURES & set(item.fixturenames)) for item in items}
    for item in items:
        if uses_ray[item]:
            item.add_marker(pytest.mark.ray)
    items.sort(key=uses_ray.get)  # stable


@pytest.fixture(scope="session", autouse=True)
def session_search(request, tmp_path_factory):
    """The session's one high-level search of glit_micro on digits, run as a user runs it (`python -m glit_ray.search`,
    joining the session's cluster), started with the first test when any collected test reads it: {"out": its run
    dir, "process": its Popen, "console": the files its stdout and stderr go to}. The supernet it trains is the
    session's. Tests that use Ray wait for it (`search_finished`), so that it never competes with them for the
    cluster's CPUs."""
    if not any("high_search_process" in item.fixturenames for item in request.session.items):
        yield {}
        return
    cluster = request.getfixturevalue("ray_cluster")
    folder = tmp_path_factory.mktemp("high-search")
    console = [folder / "stdout.txt", folder / "stderr.txt"]
    with console[0].open("w") as stdout, console[1].open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "glit_ray.search", *HIGH_SEARCH, "--out", str(folder / "run")],
                                   stdout=stdout, stderr=stderr, env=joining(cluster))
    yield {"out": folder / "run", "process": process, "console": console}
    process.kill()
    process.wait()


def search_finished(session_search: dict) -> None:
    """Wait for the session's search, if this session started one."""
    if session_search:
        session_search["process"].wait(timeout=600)


@pytest.fixture(scope="session")
def high_search_process(session_search) -> tuple:
    """The session's search, finished: (its run dir, its console output)."""
    search_finished(session_search)
    stdout, stderr = (path.read_text() for path in session_search["console"])
    assert session_search["process"].returncode == 0, stderr[-3000:]
    return session_search["out"], stdout + stderr


@pytest.fixture(scope="session")
def micro_supernet(high_search_process):
    """The session's high-level micro supernet (its supernet.pt): the one its search trained, 2 fair epochs of batch 32."""
    return high_search_process[0] / "supernet" / "supernet.pt"


@pytest.fixture(scope="session")
def untrained_supernet(micro, tmp_path_factory):
    """A high-level micro supernet for digits, saved as training saves one but untrained: for the tests that score
    candidates on a supernet or inherit from one whatever its weights, so that they need not wait for the session's
    search (`pytest tests/test_multinode.py` runs without it)."""
    import torch

    from glit_ray.models.supernet import GLiTSupernet, save_supernet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "supernet.pt"
    save_supernet(GLiTSupernet(micro, "high", num_classes=10), path, data="digits", epochs=0, seed=0)
    return path


@pytest.fixture(scope="session")
def high_search(high_search_process) -> tuple:
    """The finished search: (its run dir, its command line). Read it; copy it before changing it."""
    return high_search_process[0], HIGH_SEARCH
