"""Ray Data ingest (`--ingest ray-data`): a training worker's images decoded and augmented on any CPU of the cluster.

With the DataLoader (`--ingest loader`, the default), a Ray Train worker decodes its images in loader processes
on its own node, so a GPU node needs the CPUs to feed its GPUs. With Ray Data, each worker runs a small Ray Data
pipeline per epoch over its own shard: Ray tasks read, decode and augment the images wherever a CPU is free
(CPU-only node types included), and the worker streams the uint8 batches from the object store.

The shard, its order and the per-sample augmentation are the DataLoader path's (`EpochSampler` over
`DistributedSampler`, `SeededSamples` keyed by (seed, epoch, index)) and Ray Data keeps the order, so a worker
trains on exactly the batches it would have loaded itself: the weights equal the DataLoader path's, and a resumed
epoch replays. (Not Ray Train's `get_dataset_shard`: its streaming split hands blocks to whichever worker asks
first, so a worker's batches, and a resumed epoch's, would differ from run to run.)
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray
import torch

DECODE_BATCH = 64  # images per Ray Data task batch
PREFETCH_BATCHES = 4  # training batches a worker keeps in flight
_fetched: dict[str, object] = {}  # the samples, once per task process


def _decode(rows: dict, samples: ray.ObjectRef) -> dict:
    """A Ray Data batch of (epoch, index) keys -> their uint8 images and labels, and the node that decoded them."""
    key = samples.hex()
    if key not in _fetched:
        _fetched.clear()
        _fetched[key] = ray.get(samples)
    dataset = _fetched[key]
    images, labels = zip(*(dataset[(int(e), int(i))] for e, i in zip(rows["epoch"], rows["index"])))
    node = ray.get_runtime_context().get_node_id()
    return {"image": torch.stack(images).numpy(), "label": np.asarray(labels, dtype=np.int64),
            "node": np.asarray([node] * len(labels))}


class RayDataFeed:
    """A worker's training batches through Ray Data, iterated as its DataLoader would be: `sampler.set_epoch`, then
    one pass of uint8 (images, labels) batches. `decoded_on`: the nodes whose CPUs decoded the last pass's."""

    def __init__(self, samples, sampler, batch_size: int):
        self.samples, self.sampler, self.batch_size = ray.put(samples), sampler, batch_size
        self.decoded_on: set[str] = set()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = context.print_on_execution_start = False
        self.decoded_on = set()
        keys = [{"epoch": epoch, "index": index} for epoch, index in self.sampler]
        dataset = ray.data.from_items(keys).map_batches(_decode, fn_kwargs={"samples": self.samples},
                                                        batch_size=DECODE_BATCH, num_cpus=1)
        for batch in dataset.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                                          prefetch_batches=PREFETCH_BATCHES):
            self.decoded_on.update(batch["node"].tolist())
            # the object store's buffers are read-only; torch takes only writable arrays (a copy where they are not)
            yield (torch.from_numpy(np.require(batch["image"], requirements="W")),
                   torch.from_numpy(np.require(batch["label"], requirements="W")))
