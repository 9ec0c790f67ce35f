"""Multi-node behaviour on one machine: the session's Ray cluster grows two worker nodes."""
import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch

from glit_ray.cluster.placement import Actors, Placement
from glit_ray.cluster.ray_workarounds import HEAD_NODE_RESOURCE
from glit_ray.search import build_parser, search, settings_from_args
from glit_ray.searching.results import read_candidates
from glit_ray.training.data import build_splits
from glit_ray.training.ingest import RayDataFeed
from glit_ray.training.loaders import EpochSampler, SeededSamples, shard_of, training_loader
from test_train_supernet import wait_for


@pytest.fixture(scope="module")
def worker_nodes(ray_cluster):
    """Two worker nodes of 1 CPU each beside the 2-CPU head, for the module (its last test removes one); removed
    again after it."""
    nodes = [ray_cluster.add_node(num_cpus=1) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    yield nodes
    for node in nodes:
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)
    ray_cluster.wait_for_nodes()


def search_argv(supernet, *extra):
    return ["--level", "high", "--supernet", str(supernet), "--population", "12", "--mutations", "6",
            "--crossovers", "6", "--topk", "4", *extra]


@ray.remote(num_cpus=2, resources={HEAD_NODE_RESOURCE: 0.001})
class TrainingWorkerOnTheHead:
    """Holds every CPU of the 2-CPU head, as a Ray Train worker of 2 CPUs does, and streams its shard's batches
    through Ray Data (`--ingest ray-data`)."""

    def epoch(self, splits, seed: int, world: int, rank: int, epoch: int) -> tuple:
        feed = RayDataFeed(SeededSamples(splits.train, seed), EpochSampler(shard_of(splits, seed, world, rank)), 16)
        feed.sampler.set_epoch(epoch)
        batches = list(feed)
        return batches, sorted(feed.decoded_on), ray.get_runtime_context().get_node_id()


def test_ray_data_decodes_on_other_nodes_the_very_batches_the_dataloader_loads(folder224, ray_cluster, worker_nodes,
                                                                              shipped_by_value):
    """The worker's node has no CPU to spare: the 224-px images are decoded and augmented on the two worker nodes,
    and the batches are the DataLoader path's, sample for sample and in order (so the weights are too)."""
    splits = build_splits(f"imagefolder:{folder224}", 224, 3)
    worker = TrainingWorkerOnTheHead.remote()
    for epoch in (0, 1):
        batches, decoded_on, worker_node = ray.get(worker.epoch.remote(splits, 3, 4, 1, epoch))
        loader = training_loader(splits, 16, seed=3, loader_workers=0, device=torch.device("cpu"), world=4, rank=1)
        loader.sampler.set_epoch(epoch)
        expected = list(loader)
        assert len(batches) == len(expected) == 80 // 16
        for (images, labels), (loaded, loaded_labels) in zip(batches, expected):
            assert images.dtype == torch.uint8 and torch.equal(images, loaded) and torch.equal(labels, loaded_labels)
        assert worker_node == ray_cluster.head_node.node_id
        assert decoded_on and set(decoded_on) <= {node.node_id for node in worker_nodes}
    ray.kill(worker)


def test_candidates_fan_out_over_the_nodes_and_a_node_removed_mid_search_loses_none(untrained_supernet, ray_cluster,
                                                                                   worker_nodes, tmp_path):
    """Evaluators on every node (SPREAD); a worker node whose evaluator scored generation 0 is removed once that
    generation is written, while the next one scores: the search goes on without it and loses no candidate."""
    argv = search_argv(untrained_supernet, "--generations", "3", "--actors", "4", "--heldout-images", "128")
    settings = settings_from_args(build_parser().parse_args([*argv, "--out", str(tmp_path)]))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(  # an untrained supernet: what is scored where is the point
        best=search(settings, Placement(tmp_path, actors=Actors(count=4)), search_unlearnt=True)))
    thread.start()
    generation0 = tmp_path / "candidates" / "gen-0000.parquet"
    assert wait_for(generation0.exists, 180), "no generation 0 within 180 s"
    scored = set(pq.read_table(generation0, columns=["node"]).column("node").to_pylist())
    doomed = next((node for node in worker_nodes if node.node_id in scored), None)
    assert doomed, f"no worker node scored generation 0: {scored}"
    assert thread.is_alive(), "the search ended before the node could be removed"
    ray_cluster.remove_node(doomed)
    gone_at = time.time()
    thread.join(timeout=280)
    assert not thread.is_alive() and "best" in outcome
    rows = read_candidates(tmp_path).to_pylist()
    assert len(rows) == 12 * 3 == len({r["arch"] for r in rows})
    assert all(r["status"] == "ok" for r in rows)
    assert [r["generation"] for r in rows] == sorted(r["generation"] for r in rows)
    first = {r["node"] for r in rows if r["generation"] == 0}
    assert len(first) >= 2 and first <= {n["NodeID"] for n in ray.nodes()}
    # the removed node scored until it went, and never after; the other nodes scored on once it was gone (the last
    # generation wholly): it went mid-search, not after the search had scored everything
    def scored_at(row: dict) -> float:
        return row["timestamp"].timestamp()

    assert max(scored_at(r) for r in rows if r["node"] == doomed.node_id) < gone_at
    assert all(scored_at(r) > gone_at for r in rows if r["generation"] == 2)
    # Tune's generation trial, which feeds the actors, stayed on the head node: one process, never restarted
    results = [json.loads(line) for path in (tmp_path / "tune").glob("gen-*/result.json") for line in path.open()]
    assert sorted(r["generation"] for r in results) == [0, 1, 2]
    assert {(r["node"], r["pid"]) for r in results} == {(ray_cluster.head_node.node_id, results[0]["pid"])}
