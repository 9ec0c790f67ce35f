"""A GLiT network, or one of its parts, as an ONNX graph: what runs where torch does not (ONNX Runtime on a server CPU,
a phone, a browser), and what the latency table times there (`glit_ray.models.latency_table`).

ONNX, ONNX Runtime and onnxscript are an optional extra, `pip install 'glit_ray[onnx]'`: search and training need
none of them. The graph comes from torch's dynamo exporter (torch.export, translated by onnxscript) at the opset the
installed torch writes by default; its batch axis is symbolic, so one file serves every batch. (The TorchScript
exporter is faster but deprecated, and its deprecation warning fails this project's tests.)
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from glit_ray.core.errors import UserError
from glit_ray.core.files import write_atomic

INSTALL = "pip install 'glit_ray[onnx]'"
INPUT, OUTPUT = "images", "logits"


def require(module: str) -> ModuleType:
    """`module` (onnx, onnxscript, onnxruntime) imported, or one line naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed (ONNX export and ONNX Runtime are an optional extra): {INSTALL}") from None


def onnx_graph(module: nn.Module, example: torch.Tensor, input_name: str = "input", output_name: str = "output",
               metadata: dict[str, str] | None = None) -> bytes:
    """`module` in eval mode as a serialised ONNX model of one input, traced with `example`, whose first axis (the
    batch) is symbolic; `metadata` goes into the model's metadata_props."""
    for name in ("onnx", "onnxscript"):
        require(name)
    training = module.training
    module.eval()
    try:
        program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=[output_name],
                                    dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    finally:
        module.train(training)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: str | Path, batch: int = 1) -> Path:
    """Write `model` (a GLiT) to `path` as ONNX, atomically: input `images` (batch, channels, size, size), output
    `logits`. `batch`: the example's batch it is traced with; the file takes any. The model's architecture and its
    timm `pretrained_cfg` (preprocessing), where it has one, ride along as metadata."""
    size, channels = model.patch_embed.img_size, model.patch_embed.proj.in_channels
    example = torch.zeros(batch, channels, *size, device=next(model.parameters()).device)
    metadata = {"glit_ray.arch": str(model.arch)}
    if getattr(model, "pretrained_cfg", None):
        metadata["timm.pretrained_cfg"] = json.dumps(model.pretrained_cfg, default=str, sort_keys=True)
    path = Path(path)
    write_atomic(path, onnx_graph(model, example, INPUT, OUTPUT, metadata))
    return path


def onnx_session(graph: bytes | str | Path, threads: int = 1):
    """An ONNX Runtime CPU session of `graph` (serialised bytes or a file) on `threads` intra-op threads, its nodes
    run one after another: the setting a latency figure is measured and deployed with."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
