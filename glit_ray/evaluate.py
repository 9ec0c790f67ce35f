"""Evaluate a trained GLiT on a data set's test split: top-1/top-5, images/s, written as JSON.

    python -m glit_ray.evaluate --model glit_tiny_patch16_224 --checkpoint glit_tiny.pth.tar --data imagefolder:IMAGENET
    python -m glit_ray.evaluate --model runs/retrain          # a glit_ray.retrain run, on the data it trained on

`--model` is a timm name of the published family (glit_tiny/small/base_patch16_224) with
`--checkpoint` (the authors' DeiT-style file, `model` or `--ema` entry, or one of ours), or a
`glit_ray.retrain` run directory. Images are read with DeiT's evaluation view (resize, centre crop
0.875, bicubic) and normalised on the device; on a GPU the forward pass runs under bfloat16
autocast, as DeiT evaluates under AMP. `--workers N` splits the test split into N contiguous shards
scored by N Ray tasks at once (a GPU each when the cluster has GPUs); without it the model is
evaluated in this process, on its GPU when there is one.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import ray
import timm
import torch
from torch.utils.data import Dataset, Subset

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.resources import Request, plan, waiting_note
from glit_ray.core.cli import ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_json
from glit_ray.core.progress import console as make_console
from glit_ray.models.checkpoint import fit_state_dict, read_checkpoint
from glit_ray.models.export import ARCH, load_model
from glit_ray.models.glit import GLiT
from glit_ray.models.scoring import evaluate
from glit_ray.training.data import build_test, view_batches
from glit_ray.training.fit import ensure_ray
from glit_ray.training.flags import add_worker_resources
from glit_ray.training.loaders import default_loader_workers

PUBLISHED = ("glit_tiny_patch16_224", "glit_small_patch16_224", "glit_base_patch16_224")
RESULT = "evaluation.json"


def resolve_model(name: str, checkpoint: Path | None, ema: bool = False) -> tuple[GLiT, str | None]:
    """The model `--model`/`--checkpoint` name, in eval mode, and the data a retrain run trained on (else None)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if checkpoint is not None:
            raise UserError(f"{path} is a retrain run and carries its weights: give no --checkpoint")
        return load_model(path), read_json(path / ARCH).get("data")
    if name not in PUBLISHED:
        hint = f"run directory {path} does not exist" if os.sep in name else f"unknown model {name!r}"
        raise UserError(f"{hint}: give a glit_ray.retrain run directory or one of {', '.join(PUBLISHED)} with --checkpoint")
    if checkpoint is None:
        raise UserError(f"{name} needs its weights: give --checkpoint FILE (e.g. the authors' glit_tiny.pth.tar)")
    state = read_checkpoint(checkpoint, ema)
    classes = state["head.weight"].shape[0] if "head.weight" in state else 1000
    model = timm.create_model(name, num_classes=classes)  # timm's registry builds it; our filter maps their names
    model.load_state_dict(fit_state_dict(state, model, str(checkpoint)))
    return model.eval(), None


def evaluate_on(model: GLiT, dataset: Dataset, mean, std, device: torch.device, batch_size: int,
                loader_workers: int) -> dict:
    """Top-1/top-5/loss of `model` over `dataset` on `device` (bfloat16 autocast on a GPU), with the image count."""
    model = model.to(device).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with amp:
        metrics = evaluate(model, None, view_batches(dataset, mean, std, device, batch_size, loader_workers))
    return {**metrics, "images": len(dataset), "device": str(device)}


@ray.remote
def _evaluate_shard(model: GLiT, dataset: Dataset, start: int, stop: int, mean, std, batch_size: int,
                    loader_workers: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_on(model, Subset(dataset, range(start, stop)), mean, std, device, batch_size, loader_workers)


def evaluate_distributed(model: GLiT, dataset: Dataset, mean, std, request: Request, batch_size: int,
                         loader_workers: int | None, data: str) -> dict:
    """`evaluate_on` over the tasks of `request`, a contiguous shard each, combined by count."""
    if loader_workers is None:
        loader_workers = default_loader_workers(data, request.cpus)
    bounds = [round(i * len(dataset) / request.count) for i in range(request.count + 1)]
    model_ref, dataset_ref = ray.put(model.cpu()), ray.put(dataset)
    shards = [_evaluate_shard.options(num_cpus=request.cpus, num_gpus=request.gpus).remote(
        model_ref, dataset_ref, start, stop, mean, std, batch_size, loader_workers)
        for start, stop in zip(bounds, bounds[1:]) if stop > start]
    try:
        parts = ray.get(shards)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):  # an unreadable image, named in one line
            raise exc.cause from None
        raise
    images = sum(p["images"] for p in parts)
    combined = {k: sum(p[k] * p["images"] for p in parts) / images for k in ("top1", "top5", "loss")}
    return {**combined, "images": images, "device": ", ".join(sorted({p["device"] for p in parts}))}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    console = make_console()
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give at least 1 (or leave it out to evaluate in this process)")
    model, trained_on = resolve_model(args.model, args.checkpoint, args.ema)
    data = args.data or trained_on
    if data is None:
        raise UserError(f"{args.model} needs the data to evaluate on: give --data imagefolder:PATH (or cifar10:PATH, digits)")
    img_size, in_chans = model.patch_embed.img_size[0], model.patch_embed.proj.in_channels
    dataset, mean, std, classes = build_test(data, img_size, in_chans)
    if classes != model.num_classes:
        raise UserError(f"{data} has {classes} classes but the model's head has {model.num_classes}; "
                        "evaluate on the data set it was trained for")
    run_dir = Path(args.model).expanduser()
    out = args.out or (run_dir / RESULT if run_dir.is_dir() else Path(RESULT))
    request = None
    if args.workers:
        ensure_ray()
        request = plan("evaluate", args.workers, args.gpus_per_worker, args.cpus_per_worker, unit="task",
                       together=False)
    console.print(f"evaluating {args.model} ({model.arch}) on {len(dataset)} test images of {data} in "
                  f"{'Ray tasks' if request else 'this process'}")
    if request:
        console.print(str(request))
    started = time.perf_counter()
    if request:
        with waiting_note(request, console.print):
            metrics = evaluate_distributed(model, dataset, mean, std, request, args.batch_size, args.loader_workers, data)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loader_workers = default_loader_workers(data, os.cpu_count() or 1) if args.loader_workers is None else args.loader_workers
        metrics = evaluate_on(model, dataset, mean, std, device, args.batch_size, loader_workers)
    seconds = time.perf_counter() - started
    result = {"model": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None, "ema": args.ema,
              "arch": str(model.arch), "params": sum(p.numel() for p in model.parameters()), "data": data,
              "split": "test", **metrics, "seconds": seconds, "images_per_s": metrics["images"] / seconds,
              "workers": args.workers or 0, "precision": "bfloat16" if "cuda" in metrics["device"] else "float32"}
    write_json(out, result)
    console.print(f"test top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['images']} images; "
                  f"{result['images_per_s']:.0f} images/s on {result['device']} -> {out}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"a glit_ray.retrain run directory, or one of {', '.join(PUBLISHED)}")
    parser.add_argument("--checkpoint", type=Path, help="weights of a --model name (their .pth.tar, ours .safetensors)")
    parser.add_argument("--ema", action="store_true", help="take the checkpoint's model_ema entry")
    parser.add_argument("--data", help="digits, cifar10:PATH, cifar100:PATH or imagefolder:PATH (default: a run's own)")
    parser.add_argument("--workers", type=int, help="Ray tasks to split the test split over (a GPU each on a GPU cluster)")
    add_worker_resources(parser, who="task")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loader-workers", type=int, help="DataLoader processes per evaluation (default: one per CPU on images)")
    parser.add_argument("--out", type=Path, help=f"the JSON written (default: RUN_DIR/{RESULT}, else ./{RESULT})")
    return parser


if __name__ == "__main__":
    run(main)
