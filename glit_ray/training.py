"""A training recipe on Ray Train, shared by supernet training and retraining.

Both train a vision transformer the way timm's train.py does with the run's recipe (`glit_ray.recipe`: optimizer,
schedule with warm-up stepped per update, augmentation, mixup/cutmix or label smoothing; gradient clipping, AMP on a
GPU), checkpoint every epoch through Ray Train and resume from the latest
checkpoint. What differs is the network and what a step runs through it: the supernet runs a
sampled path (`net(images, arch)`), a retrained architecture is a plain `net(images)`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import random
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from torch.utils.tensorboard import SummaryWriter

from .cli import ArgumentParser, callers_signal_handlers
from .data import DeviceAugment, Splits, build_splits, mixup_for
from .errors import UserError, one_line
from .ingest import RayDataFeed
from .model import compile_operations
from .progress import bar as progress_bar
from .progress import say
from .recipe import FUSED, Recipe, add_recipe_arguments, header, recipe_from_args
from .failure_policy import MAX_FAILURES
from .ray_workarounds import restarts_for_failures_only, torch_config, train_result
from .resources import ClusterShape, Request, placed_device, waiting_note

if TYPE_CHECKING:  # for annotations only: the run settings are a layer above; objects come from the callers
    from .settings import Placement, Training

CLIP_GRAD_NORM = 5.0
INGESTS = ("loader", "ray-data")
LOG_EVERY = 10  # steps between the step loss and learning rate logged to TensorBoard
INPUT_BOUND = 0.1  # share of an epoch spent waiting for the loader past which its line says so
STATE_FILE = "state.pt"


def check_epoch_has_a_step(train_images: int, batch_size: int, workers: int,
                           fix: str = "lower --batch-size or --workers") -> None:
    """Each worker drops its last partial batch, so a batch per worker must fit in the training split."""
    if batch_size * workers > train_images:
        raise UserError(f"a batch of {batch_size} on each of {workers} worker(s) is more than the {train_images} "
                        f"training images, so an epoch would have no step; {fix}")


def add_arguments(parser: ArgumentParser, epochs: int, batch_size: int, from_run: bool = False,
                  **recipe_defaults) -> None:
    """The command-line options every training run has, with this run's defaults (`recipe_defaults`: parts of the
    recipe this command sets apart from the presets, as the supernet's drop-path of 0).

    `from_run`: --space and --data default to None, for the caller to take from a search run.
    """
    default = ": that of the search run --arch names, else {}" if from_run else ": {}"
    parser.add_argument("--space", default=None if from_run else "glit_micro",
                        help="YAML path or built-in name (default" + default.format("glit_micro") + ")")
    parser.add_argument("--data", default=None if from_run else "digits",
                        help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH (default" + default.format("digits") + ")")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per worker")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    add_worker_resources(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes per Ray Train worker (default: the worker's CPUs on image data, "
                             "0 on digits, which are tensors in memory)")
    add_training_placement(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (re-running into it does too)")
    parser.add_argument("--storage", help="where Ray Train keeps its checkpoints (default: --out); a URI such as "
                                          "s3://bucket/prefix on a cluster whose nodes do not share --out")
    add_recipe_arguments(parser, **recipe_defaults)


def add_worker_resources(parser: ArgumentParser, who: str = "worker") -> None:
    """--gpus-per-worker and --cpus-per-worker: what each Ray Train worker asks of the cluster (`resources.plan`)."""
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help=f"GPUs each {who} asks for (default: 1 where the cluster has or can add GPU nodes, else 0)")
    parser.add_argument("--cpus-per-worker", type=int, default=None,
                        help=f"CPUs each {who} asks for (default: its share of the node type that hosts it)")


def add_training_placement(parser: ArgumentParser) -> None:
    """--ingest, --grad-checkpointing and --torchcompile: how a training run feeds its workers and computes on them
    (none changes its result)."""
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass instead of keeping them: less "
                             "device memory (a larger batch, Base on a 24 GB card) for about a third more compute")
    parser.add_argument("--torchcompile", nargs="?", const="inductor", default=None, type=compile_backend,
                        metavar="BACKEND",
                        help="compile each attention, convolution and MLP operation on the workers with torch.compile "
                             "(BACKEND, as timm's train.py takes it; default inductor): fused kernels and fewer "
                             "launches for the first steps' compile time; the same checkpoints "
                             "(glit_ray.model.compile_operations)")
    parser.add_argument("--ingest", choices=INGESTS, default="loader",
                        help="loader: each Ray Train worker decodes its images in DataLoader processes on its node "
                             "(default); ray-data: Ray Data tasks decode them on any CPU of the cluster, CPU-only "
                             "nodes included, with the same batches (see glit_ray.ingest)")


def compile_backend(name: str) -> str:
    """`--torchcompile BACKEND`, checked where the command starts rather than on its workers."""
    if name not in torch.compiler.list_backends(exclude_tags=()):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch.compile backend; give one of "
                                         f"{', '.join(torch.compiler.list_backends())} or leave BACKEND out (inductor)")
    return name


def check_ingest(ingest: str, request: Request, shape: ClusterShape) -> None:
    """Refuse (UserError) `--ingest ray-data` on a cluster whose CPUs the training workers of `request` would all
    hold: its decoding tasks would wait for ever."""
    if ingest != "ray-data":
        return
    spare = sum(t.cpus * t.max_count for t in shape.node_types) - request.count * request.cpus
    if spare < 1:
        raise UserError(f"--ingest ray-data decodes on CPUs the training workers do not hold, and {request} holds "
                        f"every CPU of {shape}; lower --cpus-per-worker, add a CPU node type, or drop --ingest")


def check_counts(args) -> None:
    for name in ("epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def training_recipe(args, data: str, space, batch_size: int | None = None, prefix: str = "",
                    **command_defaults) -> Recipe:
    """The recipe of a training command's run (`prefix`: of the search's supernet): `recipe_from_args` for the
    training split of `data` at the space's image size, checked against the run's batch (`batch_size`, else
    --batch-size: mixup pairs images). Lists the data set's files, before Ray."""
    recipe = recipe_from_args(args, training_images(data, space), space.img_size, prefix, **command_defaults)
    recipe.check_batch(batch_size or args.batch_size)
    return recipe


def training_images(data: str, space) -> int:
    """How many images `data`'s training split holds at `space`'s size (what a recipe preset is chosen by)."""
    return len(build_splits(data, space.img_size, space.in_chans).train)


def say_recipe(settings: Training, train_images: int, say) -> None:
    """The header's recipe line (`recipe.header`)."""
    say(header(settings.recipe, train_images, settings.space.img_size, settings.batch_size, settings.workers))


def default_loader_workers(data: str, cpus: float) -> int:
    """DataLoader processes per Ray Train worker: one per CPU it holds on image data (decoding and augmenting
    224-px JPEGs is the input pipeline's cost; BENCHMARKS.md, P6), none for the in-memory digits."""
    return 0 if data == "digits" else max(1, int(cpus))


class EpochSampler(Sampler):
    """This worker's shard of the training set for the epoch `set_epoch` names, as (epoch, index) pairs."""

    def __init__(self, shard: DistributedSampler):
        self.shard, self.epoch = shard, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shard.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.shard)

    def __len__(self) -> int:
        return len(self.shard)


class SeededSamples(Dataset):
    """A training set whose augmentation of each sample is a function of (seed, epoch, index).

    Loader processes persist across epochs (timm's and DeiT's habit), so their random state would
    carry over from the epoch they started in, and a resumed run would augment differently. Seeding
    per sample makes the augmentation the same with any number of loader processes, resumed or not.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # in a loader process the random state is the sample's alone; in the training process (no loader
        # processes) it is put back, so that the draws of the step's drop-path and mixup stay as they were
        with nullcontext() if get_worker_info() else preserved_random_state():
            seed_all(((self.seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63, gpus=False)
            return self.dataset[index]


def worker_loader(splits: Splits, job: TrainJob, device: torch.device) -> DataLoader | RayDataFeed:
    """This worker's shard of `job`'s training set: loaded here (`training_loader` with its rank), or with
    `job.ingest` "ray-data" the same batches decoded on the cluster's CPUs (`ingest.RayDataFeed`)."""
    rank, world = rank_and_world(job)
    batch_size, seed, loader_workers = job.settings.batch_size, job.settings.seed, job.loader_workers
    if job.ingest == "ray-data":
        check_epoch_has_a_step(len(splits.train), batch_size, world)
        return RayDataFeed(SeededSamples(splits.train, seed), EpochSampler(shard_of(splits, seed, world, rank)), batch_size)
    return training_loader(splits, batch_size, seed, loader_workers, device, world, rank)


def shard_of(splits: Splits, seed: int, world: int, rank: int) -> DistributedSampler:
    """Worker `rank`'s share of the training set, reshuffled per epoch (`set_epoch`), whole batches only."""
    return DistributedSampler(splits.train, world, rank, shuffle=True, seed=seed, drop_last=True)


def training_loader(splits: Splits, batch_size: int, seed: int, loader_workers: int, device: torch.device,
                    world: int = 1, rank: int = 0, **loader_options) -> DataLoader:
    """Shard `rank` of `world` of the training set, reshuffled per epoch by `loader.sampler.set_epoch`.

    Loader processes persist across epochs and pin their batches for a GPU; image augmentation is
    seeded per sample (`SeededSamples`), so that a resumed run replays an uninterrupted one.
    `loader_options` go to the DataLoader (the input-pipeline benchmark tries others).
    """
    check_epoch_has_a_step(len(splits.train), batch_size, world)
    shard = shard_of(splits, seed, world, rank)
    dataset, sampler = splits.train, shard
    if splits.natural_images:
        dataset, sampler = SeededSamples(splits.train, seed), EpochSampler(shard)
    options = {"persistent_workers": loader_workers > 0, "pin_memory": device.type == "cuda", **loader_options}
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, num_workers=loader_workers, **options)


def worker_device(job: TrainJob) -> torch.device:
    """This worker's device: its GPU (`use_fast_gpu_kernels`), or the CPU where Ray gave it none (or a fake one,
    `resources.placed_device`: `DeviceTorchConfig` then connects Ray Train's workers over gloo)."""
    if placed_device("Tune trial" if job.in_trial else "Ray Train worker").type == "cpu":
        return torch.device("cpu")
    use_fast_gpu_kernels()
    return torch.device("cuda", 0) if job.in_trial else ray.train.torch.get_device()  # a trial sees its GPU alone


def reporting(job: TrainJob):
    """The Ray API a training process reports its epochs and finds its checkpoints through: Ray Train's on a Ray Train
    worker, Tune's in a Tune trial that trains in its own process (`TrainJob.in_trial`); both have `get_checkpoint`,
    `report` and `Checkpoint`."""
    return ray.tune if job.in_trial else ray.train


def rank_and_world(job: TrainJob) -> tuple[int, int]:
    """This worker's rank and the number of `job`'s workers (0 of 1 in a Tune trial that trains on its own)."""
    if job.in_trial:
        return 0, 1
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def prepared(net: nn.Module, job: TrainJob, device: torch.device, **ddp) -> nn.Module:
    """`net` as the job's workers train it: wrapped by Ray Train (DDP across its workers, `ddp` its options), or as it
    is in a Tune trial of its own."""
    if job.in_trial:
        return net.to(device)
    return ray.train.torch.prepare_model(net, move_to_device=device, parallel_strategy_kwargs=ddp or None)


def use_fast_gpu_kernels() -> None:
    """As timm's train.py does: cuDNN times its convolution kernels once per shape and keeps the fastest (a path's
    shapes are fixed, and a supernet has a bounded number of them), and float32 matmuls outside autocast run in TF32."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # the call torch.compile reads (mixing in fp32_precision raises)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed dropout, drop-path and mixup per epoch, so a resumed epoch replays an uninterrupted one."""
    seed_all(seed * 100_003 + epoch * 101 + rank)


def seed_all(value: int, gpus: bool = True) -> None:
    """Seed the random state timm's layers and augmentations draw from: torch's (its GPUs' too, with `gpus`),
    `random`'s and NumPy's."""
    if gpus:
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


@contextmanager
def preserved_random_state():
    """Put this process's CPU random state (torch's, `random`'s, NumPy's) back when the block ends. About
    0.1 ms, most of it NumPy's: a sample loaded in a loader process does without."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


@dataclass(frozen=True)
class TrainJob:
    """What every Ray Train worker of a run is given: the run's settings, whole, and how this run trains them."""
    settings: Training  # a SupernetRun or a RetrainRun
    out: str  # the run directory: TensorBoard writes RUN_DIR/tb
    label: str  # what its console lines call it
    progress: bool  # a progress bar on rank 0 (the driver has a terminal)
    loader_workers: int | None = None  # None: `default_loader_workers` of the CPUs each worker asks for
    ingest: str = "loader"  # "ray-data": the batches are decoded by Ray Data on the cluster's CPUs (`ingest`)
    grad_checkpointing: bool = False  # the network recomputes its blocks' activations in the backward pass
    torchcompile: str | None = None  # the torch.compile backend the network's operations are compiled with
    score_test: bool = True  # score the test split after the last epoch (a shortlist trial never does)
    epoch_lines: bool = True  # a console line per epoch (an audit's many trials say one line each when finished)
    initial_weights: ray.ObjectRef | None = None  # a state dict to start from (retrain --from-supernet)
    in_trial: bool = False  # trained in the process of a Tune trial (one worker), reporting to Tune (`reporting`)
    storage: str | None = None  # where its checkpoints go when not the run directory: TensorBoard's files follow

    def fed(self, cpus: float) -> TrainJob:
        """This job with its loader processes decided: as given, else `default_loader_workers` of `cpus` per worker."""
        if self.loader_workers is not None:
            return self
        return replace(self, loader_workers=default_loader_workers(self.settings.data, cpus))

    @classmethod
    def placed(cls, settings: Training, out, label: str, progress: bool, where: Placement, **job) -> TrainJob:
        """A job that feeds and computes as the placement `where` says (loader processes, ingest,
        --grad-checkpointing, --torchcompile); `job`: the other fields."""
        return cls(settings, str(out), label, progress, where.loader_workers, where.ingest, where.grad_checkpointing,
                   where.torchcompile, **job)


def set_computation(net: nn.Module, job: TrainJob) -> None:
    """How the job's network computes, not what: recomputed activations (`--grad-checkpointing`), compiled operations
    (`--torchcompile`)."""
    net.set_grad_checkpointing(job.grad_checkpointing)
    if job.torchcompile:
        compile_operations(net, backend=job.torchcompile)


@dataclass
class RecipeState:
    """A run's recipe made live on one worker: optimizer, schedule, loss, on-device augmentation, mixup and mixed
    precision."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: nn.Module
    augment: DeviceAugment | None
    mixup: Mixup | None
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    session: Any = ray.train  # where it reports and finds checkpoints (`reporting`)
    resumed_metrics: dict | None = None  # the metrics of the checkpoint it resumed from

    @classmethod
    def build(cls, net: nn.Module, recipe: Recipe, lr: float, epochs: int, steps_per_epoch: int, device: torch.device,
              splits: Splits | None = None, session: Any = ray.train) -> RecipeState:
        """`recipe` at peak learning rate `lr` for `net` on the training batches of `splits` (None: batches the step
        takes as they are, unmixed): its `DeviceAugment`, its mixup/cutmix with a loss on soft targets, else its
        label smoothing, as timm's train.py chooses the loss."""
        augment = DeviceAugment(splits, device, recipe) if splits else None
        mixup = mixup_for(splits, recipe) if splits else None
        # fused: one kernel for every parameter's update, on CPU and GPU alike (the per-tensor loop of torch's
        # default on CPU took 16 ms of a GLiT-Tiny supernet step's CPU time, the fused kernel 4.5)
        fused = {"fused": True} if recipe.opt in FUSED else {}
        optimizer = create_optimizer_v2(net, recipe.opt, lr=lr, weight_decay=recipe.weight_decay, **fused)
        scheduler, _ = create_scheduler_v2(optimizer, recipe.sched, num_epochs=epochs,
                                           warmup_epochs=recipe.warmup_epochs,
                                           warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr,
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        if mixup:
            criterion = SoftTargetCrossEntropy()
        elif recipe.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(recipe.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        amp_dtype = None
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
        return cls(optimizer, scheduler, criterion, augment, mixup, scaler, amp_dtype, session)

    def step(self, forwards: Sequence[Callable], params: list[nn.Parameter], images: torch.Tensor,
             labels: torch.Tensor, update: int) -> torch.Tensor:
        """One optimisation step (update number `update`, from 0) of the mean loss of each of `forwards` on the same
        images (one network, or a supernet's paths of a step: their gradients summed, one backward pass each),
        clipping the gradients of `params` (a list: walking a supernet's modules for them costs 0.7 ms a step);
        returns the loss, left on the device: reading it makes the CPU wait for the GPU to finish the step, where it
        could queue the next one."""
        if self.augment:
            images = self.augment(images)
        if self.mixup:
            images, labels = self.mixup(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=images.device)
        for forward in forwards:
            with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                part = self.criterion(forward(images), labels) / len(forwards)
            self.scaler.scale(part).backward()
            loss += part.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step_update(num_updates=update + 1)
        return loss

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def resume(self, net: nn.Module, device: torch.device) -> int:
        """Load the run's latest checkpoint, if any, into `net` and the recipe; return the epoch to start at."""
        checkpoint = self.session.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as folder:
            try:
                state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
                net.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                self.scaler.load_state_dict(state["scaler"])
            except Exception as exc:
                raise corrupt(checkpoint, exc) from None
        self.resumed_metrics = state.get("metrics")
        return state["epoch"] + 1

    def report(self, net: nn.Module, epoch: int, metrics: dict) -> None:
        """Report the epoch's metrics to Ray Train with a checkpoint of everything a resume needs.

        The metrics go into the checkpoint too: a run resumed after its last epoch reports nothing
        more, and the caller still reads them from `final_state`.
        """
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": net.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
                        "metrics": metrics}, Path(folder) / STATE_FILE)
            self.session.report(metrics, checkpoint=self.session.Checkpoint.from_directory(folder))


def train_epochs(job: TrainJob, net: nn.Module, model: nn.Module, recipe: RecipeState, loader: DataLoader,
                 start_epoch: int, device: torch.device, score: Callable[[int], tuple[dict, str]],
                 path_at: Callable[[int], object] | None = None) -> None:
    """The epoch loop of every training run (supernet, retrain, shortlist trial), on one Ray Train worker.

    `model` is `net` as Ray Train prepared it (DDP across workers). `path_at(step)`: the supernet's paths for a step
    (one, or a fair sampler's several), each run as `model(images, path)`; the workers check after each epoch that they drew the same paths. Without it,
    `model(images)`. After each epoch, rank 0 calls `score(epoch)` for the metrics it adds (its probes, its held-out
    and test top-1) and the end of the epoch's console line; every epoch metric goes to TensorBoard as epoch/NAME,
    the step's loss and learning rate every LOG_EVERY steps as train/NAME. Rank 0 reports and checkpoints the
    epoch (`RecipeState.report`), the others report its metrics.
    """
    rank, world = rank_and_world(job)
    seed, epochs, steps, label = job.settings.seed, job.settings.epochs, len(loader), job.label
    if start_epoch >= epochs and job.in_trial:  # restored from its last checkpoint: Tune gets that epoch's report
        ray.tune.report(recipe.resumed_metrics)
    writer = SummaryWriter(str(Path(job.out) / "tb")) if rank == 0 else None
    params = list(net.parameters())
    for epoch in range(start_epoch, epochs):
        seed_epoch(seed, epoch, rank)
        loader.sampler.set_epoch(epoch)
        model.train()
        # the epoch's loss is summed on the device and read at LOG_EVERY steps and at the end: the GPU runs ahead
        digest, total_loss, started = hashlib.sha1(), torch.zeros((), device=device), time.perf_counter()
        bar = progress_bar(steps, f"{label} epoch {epoch + 1}/{epochs}", rank == 0 and job.progress)
        waited, asked = 0.0, started  # seconds spent waiting for the loader, from the second batch on
        for i, (images, labels) in enumerate(loader):
            waited += (time.perf_counter() - asked) if i else 0.0
            step = epoch * steps + i
            forwards = [model]
            if path_at:
                paths = path_at(step)
                digest.update("".join(map(str, paths)).encode())
                forwards = [lambda x, path=path: model(x, path) for path in paths]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = recipe.step(forwards, params, images, labels, step)
            total_loss += loss
            bar.update(1)
            if writer and step % LOG_EVERY == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", recipe.lr, step)
            asked = time.perf_counter()
        bar.close()
        loss = total_loss.item() / steps  # waits for the epoch's last step, so that its time counts
        seconds, images_seen = time.perf_counter() - started, steps * job.settings.batch_size * world
        metrics = {"epoch": epoch, "loss": loss, "lr": recipe.lr, "workers": world,
                   "images_per_s": images_seen / seconds, "input_wait": waited / seconds,
                   "step_images_per_s": images_seen / (seconds - waited)}
        if isinstance(loader, RayDataFeed):
            metrics["decoded_on"] = sorted(loader.decoded_on)
        if path_at:
            metrics["path_digest"] = digest.hexdigest()
            check_paths_agree(metrics["path_digest"], world)
        if rank != 0:
            reporting(job).report(metrics)
            continue
        scores, line = score(epoch)
        metrics.update(scores)
        for name in ("loss", "images_per_s", "input_wait", *scores):
            writer.add_scalar(f"epoch/{name}", metrics[name], (epoch + 1) * steps)
        writer.flush()
        if job.storage:
            upload_curves(Path(job.out) / "tb", job.storage)
        line = (f"{label} epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.3f}, "
                f"{metrics['images_per_s']:.0f} images/s, " + line + input_bound(metrics))
        if job.epoch_lines:
            say(line)
        else:
            print(line)  # the worker's log only (`ray_workarounds` keeps it off the console)
        recipe.report(net, epoch, metrics)
    if writer:
        writer.close()


def upload_curves(tb: Path, storage: str) -> None:
    """Rank 0's TensorBoard files copied whole to STORAGE/tb after each epoch: they are written on its node's disk,
    which goes with the node (a GPU node the autoscaler removes when idle, a spot instance taken back)."""
    if "://" in storage:
        target, path = pyarrow.fs.FileSystem.from_uri(storage)
    else:
        target, path = pyarrow.fs.LocalFileSystem(), storage
    target.create_dir(f"{path}/tb", recursive=True)
    pyarrow.fs.copy_files(str(tb), f"{path}/tb", source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=target)


def input_bound(metrics: dict) -> str:
    """The end of an epoch's line when its loader could not keep up: the rate the step runs at, against the epoch's."""
    if metrics["input_wait"] <= INPUT_BOUND:
        return ""
    return (f"; input-bound: the step runs {metrics['step_images_per_s']:.0f} images/s, {metrics['input_wait']:.0%} "
            "of the epoch waited for batches (raise --loader-workers or --cpus-per-worker)")


def check_paths_agree(digest: str, world: int) -> None:
    """Every worker trained the same paths this epoch (DDP would otherwise have averaged gradients of different
    subnets)."""
    if world == 1:
        return
    digests = [None] * world
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"workers trained different paths this epoch (digests {digests}); gradients were mixed")


def final_state(result: ray.train.Result) -> dict:
    """A finished run's last checkpoint: `model` (the weights) and `metrics` (rank 0's last epoch)."""
    with result.checkpoint.as_directory() as folder:
        try:
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise corrupt(result.checkpoint, exc) from None


def corrupt(checkpoint: ray.train.Checkpoint, exc: Exception) -> UserError:
    return UserError(f"checkpoint {checkpoint.path} is corrupt ({type(exc).__name__}); start the run again with a new --out")


def previous_run(storage: str) -> ray.train.Result | None:
    """The Ray Train run under STORAGE/train that an interrupted run left, with its latest checkpoint checked (whether
    its state file is a whole torch archive: its zip directory is read, not the tensors, from any storage); None when
    there is none yet. A corrupt one is refused here, before any worker starts."""
    try:
        result = train_result(f"{storage.rstrip('/')}/train")
    except RuntimeError:  # no run, or no checkpoint snapshot yet
        return None
    if result.checkpoint:
        try:
            with result.checkpoint.filesystem.open_input_file(f"{result.checkpoint.path}/{STATE_FILE}") as f:
                zipfile.ZipFile(f)
        except Exception as exc:
            raise corrupt(result.checkpoint, exc) from None
    return result


def finished_run(storage: str, epochs: int) -> ray.train.Result | None:
    """The Ray Train run under STORAGE/train when its last epoch (of `epochs`) is checkpointed: one stopped before
    its caller took the result, whose workers would train and report nothing."""
    previous = previous_run(storage)
    return previous if previous and previous.checkpoint and previous.metrics.get("epoch") == epochs - 1 else None


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray the process already has, else start one (or join `address`, else RAY_ADDRESS) with Ray's own
    log lines from ERROR up on the console (a command shows only ours of the workers' output: `ray_workarounds`)."""
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level=logging.ERROR)
        except ConnectionError as exc:  # no cluster there, or one that wants its token
            where = address or os.environ.get("RAY_ADDRESS", "auto")
            if isinstance(exc.__cause__, ray.exceptions.AuthenticationError):
                raise UserError(f"the Ray cluster at {where} wants its authentication token: set RAY_AUTH_MODE=token, "
                                "with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH") from None
            raise UserError(f"no Ray cluster to join at {where} ({str(exc).splitlines()[0]}); give --address of a "
                            "running one, or leave it and RAY_ADDRESS out to start one here") from None


def fit(train_loop, job: TrainJob, request: Request, storage: str | None = None,
        callbacks: list | None = None, say=None) -> ray.train.Result:
    """Run `train_loop({"job": job})` on the Ray Train workers of `request` with checkpoints under STORAGE/train
    (resumed if there).

    `storage` defaults to the run directory `job.out`; on a cluster whose workers do not share it, give a
    storage URI (s3://bucket/prefix) every node can reach.

    A UserError a worker raised (a corrupt checkpoint, an unreadable image) reaches the caller as itself, one line.
    A lost worker or node restarts every worker from the last checkpoint, `MAX_FAILURES` times at most
    (`failure_policy`).
    `callbacks`: Ray Train callbacks (a Tune trial passes `TuneReportCallback`, which hands each report to Tune).
    `say`: where to note that the workers wait for the autoscaler (`resources.waiting_note`), the driver's console.
    `job.loader_workers` None becomes `default_loader_workers` of the CPUs each worker asks for.
    A run to resume whose latest checkpoint is corrupt is refused before any worker starts; one whose last epoch is
    checkpointed already (stopped before its caller exported the result) returns at once, unless `callbacks` wait
    for its reports (a Tune trial takes it from `finished_run` itself).
    """
    storage = storage or job.out
    job = replace(job, storage=None if storage == job.out else storage)
    finished = finished_run(storage, job.settings.epochs)
    if finished and not callbacks:
        return finished  # its last epoch is checkpointed: workers would train nothing
    ensure_ray()
    job = job.fed(request.cpus)
    # the job goes with the train function, an object Ray Train's controller passes on unopened, not as its
    # train_loop_config, which the controller unpickles: it would import glit_ray there, 3 s before any worker starts
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(train_loop, {"job": job}),
        torch_config=torch_config(request.gpus),
        scaling_config=ray.train.ScalingConfig(num_workers=request.count, use_gpu=request.gpus > 0,
                                               resources_per_worker=request.resources),
        run_config=ray.train.RunConfig(name="train", storage_path=storage,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        with callers_signal_handlers(), restarts_for_failures_only(), \
                waiting_note(request, say) if say else nullcontext():
            return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        for failure in getattr(exc, "worker_failures", {}).values():
            if isinstance(failure, UserError):
                raise UserError(one_line(failure)) from None
        raise
