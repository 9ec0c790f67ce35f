"""A training recipe on a Ray Train worker (or in a Tune trial's process), shared by supernet training and retraining.

Both train a vision transformer the way timm's train.py does with the run's recipe (`glit_ray.training.recipe`: optimizer,
schedule with warm-up stepped per update, augmentation, mixup/cutmix or label smoothing; gradient clipping, AMP on a
GPU), checkpoint every epoch through Ray Train and resume from the latest
checkpoint. The command's options are `training_flags`, the loader `loaders`, starting the run on Ray Train
`train_runs`. What differs is the network and what a step runs through it: the supernet runs a
sampled path (`net(images, arch)`), a retrained architecture is a plain `net(images)`.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from glit_ray.cluster.mirror import Mirror
from glit_ray.cluster.placement import Placement, Workers
from glit_ray.cluster.resources import placed_device
from glit_ray.core.errors import UserError
from glit_ray.core.progress import say
from glit_ray.core.progress import bar as progress_bar
from glit_ray.models.glit import compile_operations
from glit_ray.training.data import DeviceAugment, Splits, mixup_for
from glit_ray.training.flags import check_epoch_has_a_step
from glit_ray.training.ingest import RayDataFeed
from glit_ray.training.loaders import (EpochSampler, SeededSamples, default_loader_workers, seed_epoch, shard_of,
                                       training_loader)
from glit_ray.training.recipe import FUSED, Recipe
from glit_ray.training.settings import Training


CLIP_GRAD_NORM = 5.0
LOG_EVERY = 10  # steps between the step loss and learning rate logged to TensorBoard
INPUT_BOUND = 0.1  # share of an epoch spent waiting for the loader past which its line says so
STATE_FILE = "state.pt"


def worker_loader(splits: Splits, job: TrainJob, device: torch.device) -> DataLoader | RayDataFeed:
    """This worker's shard of `job`'s training set: loaded here (`training_loader` with its rank), or with
    `job.workers.ingest` "ray-data" the same batches decoded on the cluster's CPUs (`ingest.RayDataFeed`)."""
    rank, world = rank_and_world(job)
    batch_size, seed, loader_workers = job.settings.batch_size, job.settings.seed, job.workers.loader_workers
    if job.workers.ingest == "ray-data":
        check_epoch_has_a_step(len(splits.train), batch_size, world)
        return RayDataFeed(SeededSamples(splits.train, seed), EpochSampler(shard_of(splits, seed, world, rank)), batch_size)
    return training_loader(splits, batch_size, seed, loader_workers, device, world, rank)


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


@dataclass(frozen=True)
class TrainJob:
    """What every Ray Train worker of a run is given: the run's settings, whole, and how this run trains them."""
    settings: Training  # a SupernetRun or a RetrainRun
    out: str  # the run directory: TensorBoard writes RUN_DIR/tb
    label: str  # what its console lines call it
    progress: bool  # a progress bar on rank 0 (the driver has a terminal)
    workers: Workers = field(default_factory=Workers)  # how each worker is fed and computes (the placement's)
    score_test: bool = True  # score the test split after the last epoch (a shortlist trial never does)
    epoch_lines: bool = True  # a console line per epoch (an audit's many trials say one line each when finished)
    initial_weights: ray.ObjectRef | None = None  # a state dict to start from (retrain --from-supernet)
    in_trial: bool = False  # trained in the process of a Tune trial (one worker), reporting to Tune (`reporting`)
    storage: str | None = None  # where its checkpoints go when not the run directory: TensorBoard's files follow

    def fed(self, cpus: float) -> TrainJob:
        """This job with its loader processes decided: as given, else `default_loader_workers` of `cpus` per worker."""
        if self.workers.loader_workers is not None:
            return self
        return replace(self, workers=replace(self.workers,
                                             loader_workers=default_loader_workers(self.settings.data, cpus)))

    @classmethod
    def placed(cls, settings: Training, out, label: str, progress: bool, where: Placement, **job) -> TrainJob:
        """A job whose workers are fed and compute as the placement `where` says (loader processes, ingest,
        --grad-checkpointing, --torchcompile); `job`: the other fields."""
        return cls(settings, str(out), label, progress, where.workers, **job)


def made_ready(net: nn.Module, job: TrainJob, splits: Splits, device: torch.device, **ddp):
    """`net` computing as `job` says on `device`, this worker's loader, the recipe made live and resumed from the
    run's last checkpoint, and the network wrapped for data parallelism (`ddp`: DDP's options): (loader, recipe,
    the epoch to start at, the model to step)."""
    settings = job.settings
    set_computation(net, job)
    net.to(device)
    loader = worker_loader(splits, job, device)
    recipe = RecipeState.build(net, settings.recipe, settings.lr, settings.epochs, len(loader), device, splits,
                               reporting(job))
    start_epoch = recipe.resume(net, device)
    return loader, recipe, start_epoch, prepared(net, job, device, **ddp)


def set_computation(net: nn.Module, job: TrainJob) -> None:
    """How the job's network computes, not what: recomputed activations (`--grad-checkpointing`), compiled operations
    (`--torchcompile`)."""
    net.set_grad_checkpointing(job.workers.grad_checkpointing)
    if job.workers.torchcompile:
        compile_operations(net, backend=job.workers.torchcompile)


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
    if rank == 0 and 0 < start_epoch < epochs and job.epoch_lines:  # resumed, or restarted after a lost worker
        say(f"{label}: resuming at epoch {start_epoch + 1}/{epochs} from its last checkpoint")
    writer = SummaryWriter(str(Path(job.out) / "tb")) if rank == 0 else None
    # rank 0's TensorBoard files, written on its node's disk, which goes with the node (a GPU node the autoscaler
    # removes when idle, a spot instance taken back): pushed to the run's storage after each epoch
    curves = Mirror(Path(job.out) / "tb", f"{job.storage.rstrip('/')}/tb") if writer and job.storage else None
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
        if curves:
            curves.push()
        line = (f"{label} epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.3f}, "
                f"{metrics['images_per_s']:.0f} images/s, " + line + input_bound(metrics))
        if job.epoch_lines:
            say(line)
        else:
            print(line)  # the worker's log only (`ray_workarounds` keeps it off the console)
        recipe.report(net, epoch, metrics)
    if writer:
        writer.close()


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


def corrupt(checkpoint: ray.train.Checkpoint, exc: Exception) -> UserError:
    return UserError(f"checkpoint {checkpoint.path} is corrupt ({type(exc).__name__}); start the run again with a new --out")
