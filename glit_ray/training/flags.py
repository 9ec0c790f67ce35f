"""A training command's options and the checks on them, made where the command starts, before Ray.

Every training command (`train_supernet`, `retrain`, `shortlist`, `audit`, and `search` for the supernet it trains)
takes these options; the recipe a run trains with is chosen here from its data (`training_recipe`), and what cannot
work (an epoch without a step, `--ingest ray-data` with no CPU to spare) is one `error:` line.
"""
from __future__ import annotations

import argparse

import torch

from glit_ray.cluster.resources import ClusterShape, Request
from glit_ray.core.cli import ArgumentParser, add_setting
from glit_ray.core.errors import UserError
from glit_ray.training.data import training_images
from glit_ray.training.recipe import Recipe, add_recipe_arguments, header, recipe_from_args
from glit_ray.training.settings import Training

INGESTS = ("loader", "ray-data")


def check_epoch_has_a_step(train_images: int, batch_size: int, workers: int,
                           fix: str = "lower --batch-size or --workers") -> None:
    """Each worker drops its last partial batch, so a batch per worker must fit in the training split."""
    if batch_size * workers > train_images:
        raise UserError(f"a batch of {batch_size} on each of {workers} worker(s) is more than the {train_images} "
                        f"training images, so an epoch would have no step; {fix}")


def add_arguments(parser: ArgumentParser, kind: type[Training], from_run: bool = False, **recipe_defaults) -> None:
    """The command-line options every training run has, with the defaults of its `kind` of settings
    (`recipe_defaults`: parts of the recipe this command sets apart from the presets, as the supernet's drop-path
    of 0).

    `from_run`: --space and --data default to None, for the caller to take from a search run.
    """
    where_from = ": that of the search run --arch names, else {}" if from_run else ": {}"
    parser.add_argument("--space", default=None if from_run else "glit_micro",
                        help="YAML path or built-in name (default" + where_from.format("glit_micro") + ")")
    data = kind.__dataclass_fields__["data"]
    parser.add_argument("--data", default=None if from_run else data.default,
                        help=data.metadata["help"] + " (default" + where_from.format(data.default) + ")")
    for flag in ("--epochs", "--batch-size", "--workers"):
        add_setting(parser, flag, kind, type=int)
    add_worker_resources(parser)
    add_setting(parser, "--seed", kind, type=int)
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
                             "(glit_ray.models.glit.compile_operations)")
    parser.add_argument("--ingest", choices=INGESTS, default="loader",
                        help="loader: each Ray Train worker decodes its images in DataLoader processes on its node "
                             "(default); ray-data: Ray Data tasks decode them on any CPU of the cluster, CPU-only "
                             "nodes included, with the same batches (see glit_ray.training.ingest)")


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


def training_recipe(args, data: str, space, batch_size: int | None = None, prefix: str = "",
                    **command_defaults) -> Recipe:
    """The recipe of a training command's run (`prefix`: of the search's supernet): `recipe_from_args` for the
    training split of `data` at the space's image size, checked against the run's batch (`batch_size`, else
    --batch-size: mixup pairs images). Lists the data set's files, before Ray."""
    recipe = recipe_from_args(args, training_images(data, space), space.img_size, prefix, **command_defaults)
    recipe.check_batch(batch_size or args.batch_size)
    return recipe


def say_recipe(settings: Training, train_images: int, say) -> None:
    """The header's recipe line (`recipe.header`)."""
    say(header(settings.recipe, train_images, settings.space.img_size, settings.batch_size, settings.workers))
