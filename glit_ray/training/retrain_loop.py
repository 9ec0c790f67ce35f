"""A network trained on its own: the Ray Train worker of a `RetrainRun` (the retrain command's, and each shortlist
or audit trial's), from scratch or from the weights it inherits from a supernet. Held-out top-1 every epoch; the
test split once, after the last epoch, and never in a trial. The command is `glit_ray.retrain`.
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch

from glit_ray.cluster import ray_workarounds
from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.models.glit import GLiT
from glit_ray.models.scoring import evaluate
from glit_ray.models.supernet import load_supernet
from glit_ray.training.data import build_splits, eval_batches
from glit_ray.training.loop import TrainJob, made_ready, train_epochs, worker_device
from glit_ray.training.settings import RetrainRun


def inherited_model(settings: RetrainRun, num_classes: int) -> GLiT:
    """The architecture with the weights it inherits from `settings.from_supernet`."""
    path = Path(settings.from_supernet)
    net, _ = load_supernet(path)
    space, arch = settings.space, Architecture.parse(settings.arch)
    if net.space != space:
        raise UserError(f"supernet {path} was trained on space {net.space.name}, not {space.name}; pass the matching --space")
    if net.num_classes != num_classes:
        raise UserError(f"supernet {path} has {net.num_classes} classes but {settings.data} has {num_classes}; "
                        "use a supernet trained on this dataset")
    if net.level == "low" and arch.distribution != net.distribution:
        raise UserError(f"supernet {path} holds distribution {net.distribution}, not this architecture's "
                        f"{arch.distribution}; use the supernet of its high-level search or its own low-level one")
    net.space.validate(arch, net.level)  # a low-level architecture is not in a high-level supernet
    return net.extract(arch)


def train_loop(config: dict) -> None:
    """One Ray Train worker of `config["job"]` (a `TrainJob` of a `RetrainRun`), or the Tune trial that trains it
    alone (`TrainJob.in_trial`)."""
    ray_workarounds.quiet_train_worker_log()
    job: TrainJob = config["job"]
    device = worker_device(job)
    settings: RetrainRun = job.settings
    splits = build_splits(settings.data, settings.space.img_size, settings.space.in_chans, settings.recipe)

    torch.manual_seed(settings.seed)
    net = GLiT(settings.arch, settings.space, splits.num_classes, drop_path_rate=settings.recipe.drop_path)
    if job.initial_weights is not None:
        net.load_state_dict(ray.get(job.initial_weights))
    loader, recipe, start_epoch, model = made_ready(net, job, splits, device)

    def score_heldout(epoch: int) -> tuple[dict, str]:
        """Held-out top-1/top-5, and the test split's after the last epoch (a shortlist trial never looks at it)."""
        views = {"heldout": splits.heldout}
        if epoch == settings.epochs - 1 and job.score_test:
            views["test"] = splits.test
        metrics = {f"{name}_{k}": v for name, view in views.items() for k, v in
                   evaluate(net, None, eval_batches(splits, view, device, workers=job.workers.loader_workers)).items()}
        line = f"held-out top-1 {metrics['heldout_top1']:.2f}%"
        return metrics, line + (f", test top-1 {metrics['test_top1']:.2f}%" if "test_top1" in metrics else "")

    train_epochs(job, net, model, recipe, loader, start_epoch, device, score_heldout)
