"""P8: how stable the ranking of the same candidates is as the calibration sample and held-out set shrink.

A search ranks candidates by held-out top-1 after BatchNorm recalibration on `calib_batches` x 64
training images, over `heldout_images` held-out images (`glit_ray.training.imagesets.scoring_sets`). Fewer
images make every score cheaper and every ranking noisier. For each setting a supernet is trained
briefly (a supernet trained a little already ranks paths), M distinct high-level candidates are
drawn, and each is scored against a large reference: every training image of the split as
calibration, in a seeded random order (SPOS recalibrates on random training batches), and the
whole held-out split. For each calibration size of the grid the candidate is recalibrated on
exactly the sample `scoring_sets` uses at that size (the same seeded draw, in the same order and
batches) and scored on the whole held-out split, keeping which images it got right; a held-out
size of the grid is the fixed class-stratified subset `scoring_sets` takes, so its top-1 is read
off those hits (and per-image losses) without another pass. Each cell is Kendall's tau-b
(`scipy.stats.kendalltau`) of the candidates' top-1 at that size against their top-1 at the
reference, beside the tau of the order the search ranks by (top-1, ties broken by held-out loss:
`pareto.by_top1`) against the reference's order of the same kind.

The images are decoded once (the union of the calibration samples, and the held-out split) and
each set is sliced from them; one candidate's score at the default calibration size and the largest
held-out subset is checked against `scoring_sets` + `score_on` decoding that set directly. The
supernets, the generated folder and each candidate's hits are kept in OUT: a rerun with the same
settings only tabulates (and rescoring is resumable: an interrupted run keeps what it scored).

Settings: `digits`, glit_micro on scikit-learn's digits (1,150 training images in the split, 288
held out); `folder`, glit_pico on a generated 224-px ImageNet-layout folder (`glit_ray.synthetic`),
whose training images are class-sorted on disk as ImageNet's are.

Rule: a cell (c batches, h images) is stable when it and every cell of the grid with at least as
many calibration batches and held-out images have tau >= --threshold (0.9: at most 5 % of the
candidate pairs ordered otherwise than by the reference); the recommended sizes are the stable cell
that scores the fewest images per candidate (64 c + h).

    python bench/ranking_stability.py [--settings digits folder] [--digits-candidates 40] [--folder-candidates 24]
        [--calib 1 2 4 8 16] [--heldout 64 128 256 512 1000] [--threshold 0.9] [--record]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
import shutil
from dataclasses import replace
import statistics
import time
from pathlib import Path

import ray
import torch
from scipy.stats import kendalltau
from torch.nn import functional as F

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture
from glit_ray.models.scoring import recalibrate_bn
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import load_supernet
from glit_ray.searching import pareto
from glit_ray.synthetic import write_imagefolder
from glit_ray.train_supernet import SUPERNET_FILE, supernet_run, train_supernet
from glit_ray.training.data import build_splits, labels_of, stratified_sample
from glit_ray.training.imagesets import (CALIB_BATCH_SIZE, CHUNK, EVAL_BATCH_SIZE, SCORING_DEFAULTS, ImageSet,
                                         calibration_indices, decode, heldout_indices, score_on, scoring_sets)
from glit_ray.training.recipe import PRESETS

from harness import publish

CPU = torch.device("cpu")
REFERENCE = "reference"
DRAWS = 20  # other seeded draws of the held-out subsets and halves, read off the hits
LABEL = {"digits": "digits (glit_micro)", "folder": "224-px folder (glit_pico)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits", "folder"], choices=["digits", "folder"])
    parser.add_argument("--calib", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="calibration batches of 64 (sizes the training split cannot hold are dropped)")
    parser.add_argument("--heldout", type=int, nargs="+", default=[64, 128, 256, 512, 1000],
                        help="held-out images (sizes at or over the split's are dropped; the whole split is a column)")
    parser.add_argument("--threshold", type=float, default=0.9, help="the Kendall tau a stable cell reaches")
    parser.add_argument("--seed", type=int, default=0, help="draws the candidates and the reference's order")
    parser.add_argument("--digits-candidates", type=int, default=40)
    parser.add_argument("--digits-epochs", type=int, default=10)
    parser.add_argument("--folder-candidates", type=int, default=24)
    parser.add_argument("--folder-epochs", type=int, default=6)
    parser.add_argument("--folder-lr", type=float, default=3e-3,
                        help="the folder supernet's peak learning rate (DeiT's 5e-4 x batch / 512 barely moves in 6 epochs)")
    parser.add_argument("--folder-classes", type=int, default=10)
    parser.add_argument("--folder-train-per-class", type=int, default=160, help="of which 20 %% are held out")
    parser.add_argument("--workers", type=int, default=2, help="loader processes that decode the images")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ranking-stability"))
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    ray_workarounds.apply()  # as the commands do before Ray starts
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    texts, picks = [], {}
    for name in args.settings:
        text, picks[name] = run_setting(name, args)
        texts.append(text)
    ray.shutdown()
    summary = (f"**Recommended (calibration batches, held-out images) by the rule at tau >= {args.threshold:g}: "
               + "; ".join(f"{LABEL[n]} {p}" for n, p in picks.items())
               + f".** Defaults when this ran: {', '.join(f'{k} {v}' for k, v in SCORING_DEFAULTS.items())} "
               f"(None: the whole held-out split). This run: {time.perf_counter() - started:.0f} s.")
    publish("P8", "\n\n".join([*texts, summary]), args.record)


def run_setting(name: str, args) -> tuple[str, str]:
    """Train or reuse the setting's supernet, score its candidates at every size, tabulate tau; (text, pick)."""
    t0 = time.perf_counter()
    if name == "digits":
        space, data, about = SearchSpace.load("glit_micro"), "digits", "glit_micro on digits"
        epochs, batch, lr, wanted = args.digits_epochs, 64, None, args.digits_candidates
        run_dir = args.out / f"digits-{epochs}ep"
    else:
        classes, per_class = args.folder_classes, args.folder_train_per_class
        root = (args.out / f"folder-{classes}x{per_class}").resolve()  # Ray Train's workers run elsewhere
        if not (root / "written").exists():
            write_imagefolder(root, classes, per_class, 1, size=256, seed=0)  # val (the test split) is not used here
            (root / "written").touch()
        space, data = SearchSpace.load("glit_pico"), f"imagefolder:{root}"
        about = f"glit_pico on a generated folder of {classes} classes x {per_class} 256-px JPEGs, scored at 224 px"
        epochs, batch, lr, wanted = args.folder_epochs, 32, args.folder_lr, args.folder_candidates
        run_dir = args.out / f"folder-{classes}x{per_class}-{epochs}ep-lr{lr:g}"
    supernet_dir = run_dir / "supernet"
    supernet = supernet_dir / SUPERNET_FILE
    try:  # a finished one is reused while this glit_ray loads it (its hits are keyed by the file's bytes)
        load_supernet(supernet)
    except (FileNotFoundError, UserError) as exc:
        if supernet.exists():  # saved by an earlier glit_ray, whose tensors differ: train it again
            print(f"{exc}: training it again", flush=True)
            shutil.rmtree(supernet_dir)
        supernet = train_supernet(supernet_run(space, "high", None, data, epochs, batch_size=batch,
                                               recipe=lr and replace(PRESETS["deit"], drop_path=0.0, lr=lr)),
                                  Placement(supernet_dir, resume=(supernet_dir / "run.json").exists()))
    trained = time.perf_counter() - t0
    net, _ = load_supernet(supernet)
    splits = build_splits(data, space.img_size, space.in_chans)
    n_train, labels = len(splits.calibration), labels_of(splits.heldout)
    n_heldout = len(labels)
    calib = sorted({c for c in args.calib if c * CALIB_BATCH_SIZE < n_train})
    heldout = sorted({h for h in args.heldout if h < n_heldout}) + [None]
    default_calib, _ = SCORING_DEFAULTS[data.partition(":")[0]]

    # The calibration samples, as scoring_sets draws them, and the reference: all training images, random order.
    samples = {c: calibration_indices(splits, c * CALIB_BATCH_SIZE) for c in calib}
    samples[REFERENCE] = random.Random(f"{args.seed}:reference").sample(range(n_train), n_train)
    row_key = {c: f"sample-{c}x{CALIB_BATCH_SIZE}" for c in calib} | {REFERENCE: f"all-{n_train}-order{args.seed}"}
    archs, rng = [], random.Random(args.seed)
    while len(archs) < min(wanted, space.size("high")):
        arch = space.sample("high", rng)
        if arch not in archs:
            archs.append(arch)

    # Score what the cache lacks: each set decoded once, sliced per sample.
    cache = run_dir / f"scores-{hashlib.sha1(supernet.read_bytes()).hexdigest()[:12]}"  # this supernet's
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"{hashlib.sha1(str(a).encode()).hexdigest()[:16]}.pt" for a in archs]
    stored = [torch.load(p) if p.exists() else {"arch": str(a), "rows": {}, "seconds": 0.0} for a, p in zip(archs, paths)]
    missing = [i for i, s in enumerate(stored) if any(row_key[k] not in s["rows"] for k in samples)]
    t1 = time.perf_counter()
    if missing:
        calib_sets, heldout_set = decoded_sets(splits, samples, args.workers)
    decoded = time.perf_counter() - t1
    for done, i in enumerate(missing):
        began = time.perf_counter()
        for key, calib_set in calib_sets.items():
            if row_key[key] not in stored[i]["rows"]:
                stored[i]["rows"][row_key[key]] = held_out_scores(net, archs[i], calib_set, heldout_set)
        stored[i]["seconds"] += time.perf_counter() - began
        torch.save(stored[i], paths[i].with_suffix(".tmp"))
        os.replace(paths[i].with_suffix(".tmp"), paths[i])
        print(f"{name}: scored {done + 1}/{len(missing)} candidates ({time.perf_counter() - t1:.0f} s)", flush=True)
    scores = {k: [s["rows"][row_key[k]] for s in stored] for k in samples}
    scoring = sum(s["seconds"] for s in stored)

    subsets = {h: torch.tensor(heldout_indices(splits, h)) for h in heldout}

    def top1(key, positions) -> list[float]:
        return [100.0 * float(score["hits"][positions].float().mean()) for score in scores[key]]

    def places(key, positions) -> list[int]:
        """Each candidate's place in the search's order: top-1, ties broken by held-out loss (`pareto.by_top1`)."""
        rows = [{"top1": t, "loss": float(score["loss"][positions].mean()), "arch": str(a)}
                for t, score, a in zip(top1(key, positions), scores[key], archs)]
        place = {row["arch"]: i for i, row in enumerate(pareto.by_top1(rows))}
        return [place[str(a)] for a in archs]

    truth, truth_places = top1(REFERENCE, subsets[None]), places(REFERENCE, subsets[None])
    tau = {(c, h): kendalltau(top1(c, subsets[h]), truth).statistic for c in samples for h in heldout}
    tau_ordered = {(c, h): kendalltau(places(c, subsets[h]), truth_places).statistic for c in samples for h in heldout}
    tied = {(c, h): len(archs) - len(set(top1(c, subsets[h]))) for c in samples for h in heldout}

    # The check: candidate 0 at the default calibration size and the largest held-out subset of the grid, its sets
    # decoded directly by scoring_sets and scored by score_on, against the sliced sets' hits.
    check_calib = default_calib if default_calib in calib else calib[-1]
    check_heldout = max((h for h in heldout if h is not None), default=None)
    direct = score_on(net, archs[0], scoring_sets(splits, check_calib, check_heldout, cluster=False, workers=args.workers),
                      CPU)["top1"]
    sliced = top1(check_calib, subsets[check_heldout])[0]
    assert abs(direct - sliced) <= 100.0 / len(subsets[check_heldout]) + 1e-9, (direct, sliced)

    # Read off the hits: the held-out split's split-half agreement and the held-out columns over other draws.
    halves, draws = [], {h: [] for h in heldout if h is not None}
    for s in range(DRAWS):
        half = stratified_sample(labels, n_heldout // 2, seed=100 + s)
        other = sorted(set(range(n_heldout)) - set(half))
        halves.append(kendalltau(top1(REFERENCE, torch.tensor(half)), top1(REFERENCE, torch.tensor(other))).statistic)
        for h in draws:
            draws[h].append(kendalltau(top1(REFERENCE, torch.tensor(stratified_sample(labels, h, seed=100 + s))),
                                       truth).statistic)

    def size(h):
        return n_heldout if h is None else h

    def images(cell):
        return cell[0] * CALIB_BATCH_SIZE + size(cell[1])

    stable = [(c, h) for c in calib for h in heldout
              if all(tau[(c2, h2)] >= args.threshold for c2 in calib if c2 >= c for h2 in heldout if size(h2) >= size(h))]
    best = min(stable, key=images) if stable else None

    def h_label(h):
        return f"all {n_heldout}" if h is None else str(h)

    rows = []
    for c in samples:
        label = (f"{c} x 64 = {c * CALIB_BATCH_SIZE} ({100 * c * CALIB_BATCH_SIZE / n_train:.0f} % of the reference's)"
                 if c != REFERENCE else f"reference: all {n_train}, random order")
        cells = ["1 (reference)" if (c, h) == (REFERENCE, None) else f"{tau[(c, h)]:.3f} / {tau_ordered[(c, h)]:.3f}"
                 for h in heldout]
        cells = [f"**{v}**" if (c, h) == best else v for v, h in zip(cells, heldout)]
        change = statistics.fmean(abs(a - b) for a, b in zip(top1(c, subsets[None]), truth))
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {change:.2f} |")
    rows.append(f"| reference calibration, {DRAWS} other held-out draws, mean ± std | "
                + " | ".join(f"{statistics.fmean(draws[h]):.3f} ± {statistics.stdev(draws[h]):.3f}" if h else "-"
                             for h in heldout) + " | - |")
    ranked = sorted(truth)
    cells = [cell for cell in tau if cell != (REFERENCE, None)]
    gained = [tau_ordered[cell] - tau[cell] for cell in cells]
    at_least = sum(tau_ordered[cell] >= tau[cell] for cell in cells)
    pick = "none of the grid" if best is None else f"({best[0]}, {h_label(best[1])})"
    text = "\n".join([
        f"**{LABEL[name]}**: {about}; supernet {epochs} epochs (batch {batch}"
        + (f", peak lr {lr:g}" if lr else "") + f"), {len(archs)} distinct high-level candidates; {n_train} training "
        f"images in the split, {n_heldout} held out. The candidates' reference top-1: min {ranked[0]:.1f} / median "
        f"{statistics.median(ranked):.1f} / max {ranked[-1]:.1f} %. Split-half agreement of the held-out split (tau "
        f"between two disjoint stratified halves at the reference calibration, mean ± std of {DRAWS}): "
        f"{statistics.fmean(halves):.3f} ± {statistics.stdev(halves):.3f}. Check: candidate 0 at ({check_calib}, "
        f"{h_label(check_heldout)}) is {direct:.2f} % through `scoring_sets` + `score_on`, {sliced:.2f} % sliced. "
        f"Seconds: supernet {trained:.0f} (0: reused), decoding {decoded:.0f}, scoring {scoring:.0f} (summed over "
        f"the runs that scored them).", "",
        "Kendall tau against the reference, of the candidates' top-1 / of the search's order (top-1, ties broken by "
        "held-out loss) (rows: the calibration sample `scoring_sets` draws at that size; columns: its "
        "class-stratified held-out subset):", "",
        "| calibration \\ held-out | " + " | ".join(h_label(h) for h in heldout)
        + " | mean abs. top-1 change against the reference, whole held-out split (points) |",
        "| --- | " + " | ".join("---:" for _ in heldout) + " | ---: |", *rows, "",
        f"Stable by the rule at tau >= {args.threshold:g}: "
        + (f"**{best[0]} calibration batches, {h_label(best[1])} held-out images** ({images(best)} images per candidate)."
           if best else "no cell of the grid."), "",
        f"Ties: {len(archs)} candidates share {len(set(truth))} distinct top-1 values at the reference, "
        f"{len(archs) - tied[best] if best else '-'} at the stable cell. The search's order against top-1 alone: tau at "
        f"least as high in {at_least} of {len(cells)} cells, by {statistics.fmean(gained):+.3f} on average "
        f"(min {min(gained):+.3f}, max {max(gained):+.3f}).",
    ])
    return text, pick


def decoded_sets(splits, samples: dict, workers: int) -> tuple[dict[object, ImageSet], ImageSet]:
    """The calibration set of each sample (in its order, chunked as `decode` chunks) and the whole held-out split,
    decoding each image once."""
    union = sorted(set().union(*samples.values()))
    pool = decode(splits, splits.calibration, union, workers)
    xs, ys = torch.cat([x for x, _ in pool.chunks]), torch.cat([y for _, y in pool.chunks])
    row = {index: r for r, index in enumerate(union)}
    sets = {}
    for key, indices in samples.items():
        rows = [row[i] for i in indices]
        x, y = xs[rows], ys[rows]
        chunks = [(x[s:s + CHUNK], y[s:s + CHUNK]) for s in range(0, len(rows), CHUNK)]
        sizes = {"count": len(rows), "nbytes": x.nbytes + y.nbytes}
        sets[key] = dataclasses.replace(pool, chunks=chunks, **{f.name: sizes[f.name] for f in dataclasses.fields(pool)
                                                                   if f.name in sizes})
    return sets, decode(splits, splits.heldout, heldout_indices(splits, None), workers)


@torch.no_grad()
def held_out_scores(net: torch.nn.Module, arch: Architecture, calib: ImageSet, heldout: ImageSet) -> dict:
    """Which held-out images `arch` gets right (top-1 as `scoring.evaluate` counts it) and each one's cross-entropy,
    after recalibrating on `calib`: {"hits": bool, "loss": float}, one entry per held-out image."""
    recalibrate_bn(net, arch, (x for x, _ in calib.batches(CALIB_BATCH_SIZE, CPU)))
    net.eval()
    hits, losses = [], []
    for images, labels in heldout.batches(EVAL_BATCH_SIZE, CPU):
        logits = net(images, arch).float()
        hits.append(logits.topk(min(5, logits.shape[1]), dim=1).indices[:, 0] == labels)
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
    return {"hits": torch.cat(hits), "loss": torch.cat(losses)}


if __name__ == "__main__":
    main()
