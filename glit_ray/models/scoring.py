"""Scoring one path of a supernet: BatchNorm recalibration, then held-out accuracy.

A supernet's BatchNorm running statistics mix every path it was trained on, so SPOS recomputes
them for the path being scored on a few training batches before measuring it. Supernet training's
probe paths and the search's evaluators both score this way; with `arch=None` the same functions
score a standalone network (retraining's test split, inherited weights).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from glit_ray.models.arch import Architecture


@torch.no_grad()
def recalibrate_bn(model: nn.Module, arch: Architecture | None, batches: Iterable[torch.Tensor]) -> None:
    """Reset every BatchNorm's statistics and recompute them as a plain average over `batches`."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for images in batches:
        _forward(model, images, arch)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, arch: Architecture | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Top-1, top-5 (percent) and mean cross-entropy of `arch` over labelled `batches`."""
    model.eval()
    correct1 = correct5 = loss = count = 0
    for images, labels in batches:
        logits = _forward(model, images, arch).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(labels)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss / count}


def score(model: nn.Module, arch: Architecture | None, calib: Iterable[torch.Tensor],
          batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """SPOS scoring: recalibrate BatchNorm on `calib`, then `evaluate` over `batches`."""
    recalibrate_bn(model, arch, calib)
    return evaluate(model, arch, batches)


def _forward(model: nn.Module, images: torch.Tensor, arch: Architecture | None) -> torch.Tensor:
    return model(images) if arch is None else model(images, arch)
