"""P13r: the training recipe on small folders: the preset glit_ray chooses against DeiT's recipe, side by side.

On two small real folders a user could bring (the shipped digits written as 28-px PNGs in ImageNet layout, about
1,150 training images after the held-out fifth, with glit_micro at 28 px in 4-px patches; and the generated 224-px
folder of the tests, 320 training images, with glit_pico), each recipe trains a high-level supernet and retrains one
architecture from scratch (train_supernet's default epochs and 10, the README's), through the commands' own code (`train_supernet.main`, `retrain.main`):
the supernet's probes and verdict (`glit_ray.training.verdict`), the retrained network's held-out and test top-1.

    .venv/bin/python bench/recipe_fit.py [--supernet-epochs E] [--epochs 10] [--record]
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import publish  # noqa: E402

from glit_ray import retrain  # noqa: E402

from glit_ray import train_supernet  # noqa: E402
from glit_ray.core.files import read_json  # noqa: E402
from glit_ray.models.space import SearchSpace  # noqa: E402
from glit_ray.models.supernet import load_supernet  # noqa: E402
from glit_ray.synthetic import write_digits_folder, write_imagefolder  # noqa: E402
from glit_ray.training.recipe import PRESETS  # noqa: E402
from glit_ray.training.verdict import of_meta  # noqa: E402


def micro28(folder: Path) -> Path:
    """glit_micro for 28-px RGB images in 4-px patches (49 tokens), as a user sizes a space for such a folder."""
    space = SearchSpace.load("glit_micro").to_dict()
    space.update(name="glit_micro28", img_size=28, patch_size=4, in_chans=3)
    path = folder / "glit_micro28.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def one_recipe(data: str, space: str, recipe: list[str], supernet_epochs: int, epochs: int, batch: int,
               out: Path) -> dict:
    """Train a supernet and retrain one architecture with `recipe`'s flags; their figures."""
    arch = str(SearchSpace.load(space).sample("high", random.Random(0)))  # a G per block, its sizes the defaults
    common = ["--space", space, "--data", data, *recipe]
    started = time.perf_counter()
    supernet_flags = ["--epochs", str(supernet_epochs)] if supernet_epochs else []  # none: train_supernet's default
    train_supernet.main(["--level", "high", *common, *supernet_flags, "--out", str(out / "supernet")])
    supernet_seconds = time.perf_counter() - started
    retrain.main(["--arch", arch, *common, "--epochs", str(epochs), "--batch-size", str(batch),
                  "--out", str(out / "retrain")])
    preset = read_json(out / "retrain" / "run.json")["settings"]["recipe"]["preset"]
    preset += " (lr: small-data's rule)" if "--lr-base" in recipe else ""
    verdict = of_meta(load_supernet(out / "supernet" / "supernet.pt")[1])
    metrics = read_json(out / "retrain" / "metrics.json")
    return {"recipe": preset, "verdict": verdict,
            "heldout": metrics["heldout_top1"], "test": metrics["test_top1"],
            "minutes": (time.perf_counter() - started) / 60, "supernet_minutes": supernet_seconds / 60}


def row(folder: str, result: dict) -> str:
    v = result["verdict"]
    probes = f"{min(v.probes.values()):.1f}-{max(v.probes.values()):.1f} (median {v.median:.1f})"
    return (f"| {folder} | {result['recipe']} | {probes} | {v.chance:.1f} / {v.needed:.1f} | "
            f"{'learnt' if v.learnt else 'NOT learnt'} | {result['heldout']:.1f} | {result['test']:.1f} | "
            f"{result['minutes']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet-epochs", type=int, help="default: train_supernet's (8 fair epochs)")
    parser.add_argument("--epochs", type=int, default=10, help="retraining's")
    parser.add_argument("--batch", type=int, default=32, help="the retraining's batch (the supernet's: its default)")
    parser.add_argument("--folders", default="digits28,folder224")
    parser.add_argument("--deit-at-small-lr", default="digits28",
                        help="folders that also run DeiT's recipe at small-data's learning-rate rule")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    lines = ["| folder | recipe | probe top-1 % | chance / needed % | verdict | retrained held-out % | test % | "
             "minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"digits28": lambda: (f"imagefolder:{write_digits_folder(tmp / 'd28')}", str(micro28(tmp))),
                   "folder224": lambda: (f"imagefolder:{write_imagefolder(tmp / 'f224', classes=10, train_per_class=40, val_per_class=10)}",
                                         "glit_pico")}
        for name in args.folders.split(","):
            data, space = folders[name]()
            recipes = {"chosen": [], "deit": ["--recipe", "deit"]}
            if name in args.deit_at_small_lr.split(","):  # DeiT's augmentation at small-data's learning rate
                rule = PRESETS["small-data"]
                recipes["deit-lr"] = ["--recipe", "deit", "--lr-base", str(rule.lr_base), "--lr-base-size",
                                      str(rule.lr_base_size), "--lr-base-scale", rule.lr_base_scale]
            results = {tag: one_recipe(data, space, flags, args.supernet_epochs, args.epochs, args.batch,
                                       tmp / name / tag) for tag, flags in recipes.items()}
            for result in results.values():
                lines.append(row(name, result))
                print(lines[-1], flush=True)
            chosen = results["chosen"]
            for tag in (t for t in results if t != "chosen"):
                other = results[tag]
                ratios.append(f"{name}: retrained test top-1, chosen / {other['recipe']} = "
                              f"{chosen['test'] / max(other['test'], 1e-9):.2f}; probe median {chosen['verdict'].median:.1f}"
                              f" against {other['verdict'].median:.1f}")
    supernet_epochs = args.supernet_epochs or "train_supernet's default (30 uniform epochs' compute, 160 steps at least)"
    body = "\n".join([*lines, "", *(f"- {r}" for r in ratios), "",
                      f"Supernet: {supernet_epochs} epochs of fair paths, batch 32; retraining: "
                      f"{args.epochs} epochs of batch {args.batch}."])
    publish("P13r", body, args.record)


if __name__ == "__main__":
    main()
