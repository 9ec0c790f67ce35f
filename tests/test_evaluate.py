"""`python -m glit_ray.evaluate`: the authors' checkpoint on a 224-px folder, in-process and on Ray workers, and
bad input in one line."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

from glit_ray.core.cli import run
from glit_ray.evaluate import main
from glit_ray.models.glit import GLIT_TINY_ARCH
from test_checkpoint import deit_checkpoint, their_state

CLASSES = 10  # folder224's


@pytest.fixture(scope="session")  # its tests run apart: those needing no Ray run first
def their_file(tmp_path_factory):
    """Their DeiT-style checkpoint of GLiT-Tiny, its head cut to folder224's 10 classes."""
    state = their_state(0)
    state["head.weight"], state["head.bias"] = state["head.weight"][:CLASSES], state["head.bias"][:CLASSES]
    path = tmp_path_factory.mktemp("their") / "glit_tiny.pth.tar"
    torch.save(deit_checkpoint(state, None), path)
    return path


def timm_reference(path, root) -> tuple[float, float]:
    """Top-1/top-5 of the checkpoint by timm alone: its local-file loading, its data config's transform, ImageFolder."""
    model = timm.create_model("glit_tiny_patch16_224", pretrained=True, num_classes=CLASSES,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES)).eval()
    dataset = ImageFolder(str(root / "val"), create_transform(**resolve_data_config({}, model=model)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=50)
    with torch.no_grad():
        hits = [(model(x).topk(5).indices == y[:, None]) for x, y in loader]
    hits = torch.cat(hits)
    return 100 * hits[:, 0].float().mean().item(), 100 * hits.any(1).float().mean().item()


def test_their_checkpoint_scores_as_timm_does_in_process_and_on_ray_workers(ray_session, their_file, folder224, tmp_path,
                                                                             capsys):
    common = ["--model", "glit_tiny_patch16_224", "--checkpoint", str(their_file), "--data", f"imagefolder:{folder224}",
              "--batch-size", "50", "--loader-workers", "0"]
    run(main, [*common, "--out", str(tmp_path / "here.json")])
    run(main, [*common, "--workers", "2", "--out", str(tmp_path / "ray.json")])
    assert "evaluate: 2 tasks x (0 GPU, 1 CPU) on head" in capsys.readouterr().err  # what it asked of Ray
    here, on_ray = (json.loads((tmp_path / name).read_text()) for name in ("here.json", "ray.json"))

    assert here["images"] == on_ray["images"] == 10 * CLASSES
    assert here["arch"] == GLIT_TINY_ARCH and here["workers"] == 0 and on_ray["workers"] == 2
    assert here["images_per_s"] > 0 and on_ray["images_per_s"] > 0
    top1, top5 = timm_reference(their_file, folder224)  # 1 image in 100 of slack: uint8 vs float resizing
    assert abs(here["top1"] - top1) <= 1 and abs(here["top5"] - top5) <= 1
    assert (on_ray["top1"], on_ray["top5"]) == (here["top1"], here["top5"])  # two shards of 50, combined by count
    assert on_ray["loss"] == pytest.approx(here["loss"], rel=1e-5)


@pytest.mark.subprocess
def test_bad_input_is_one_line_exit_2_and_writes_nothing(their_file, folder224, tmp_path, cli_error):
    data = ["--data", f"imagefolder:{folder224}", "--out", str(tmp_path / "out.json")]
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(their_file.read_bytes()[:100_000])
    cases = [
        (["--model", "glit_tiny_patch16_224", "--checkpoint", str(tmp_path / "nope.pth.tar")], "does not exist"),
        (["--model", "glit_tiny_patch16_224", "--checkpoint", str(truncated)], "is not a readable checkpoint"),
        (["--model", "glit_small_patch16_224", "--checkpoint", str(their_file)],
         "tensor cls_token is (1, 1, 192) but the model's is (1, 1, 384)"),
        (["--model", "glit_tiny_patch16_224"], "needs its weights: give --checkpoint"),
        (["--model", "deit_tiny_patch16_224", "--checkpoint", str(their_file)], "unknown model 'deit_tiny_patch16_224'"),
        (["--model", str(tmp_path / "no-run")], "does not exist"),
        (["--model", "glit_tiny_patch16_224", "--checkpoint", str(their_file), "--workers", "0"], "--workers 0"),
    ]
    for argv, message in cases:
        assert message in cli_error(main, [*argv, *data])
    state = their_state(0)  # 1000 classes against the folder's 10
    torch.save({"model": state}, tmp_path / "imagenet.pth")
    err = cli_error(main, ["--model", "glit_tiny_patch16_224", "--checkpoint", str(tmp_path / "imagenet.pth"), *data])
    assert "has 10 classes but the model's head has 1000" in err
    assert not (tmp_path / "out.json").exists()
    done = subprocess.run([sys.executable, "-m", "glit_ray.evaluate", "--model", "glit_tiny_patch16_224",
                           "--checkpoint", str(truncated), *data], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is not a readable checkpoint" in done.stderr
