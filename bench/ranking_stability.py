"""P8: how stable the ranking of the same candidates is as the calibration sample and held-out set shrink.

A search ranks candidates by held-out top-1 after BatchNorm recalibration, on `calib_batches` x 64
training images and `heldout_images` held-out images (`glit_ray.evaluator.scoring_sets`). Fewer
images make every score cheaper and every ranking noisier. For each setting, a supernet is
trained briefly (kept in OUT and reused by later runs: a supernet trained a little still ranks
paths), M high-level candidates are drawn, and each is scored against a large reference: every
training image of the split as calibration, in a seeded random order (SPOS recalibrates on random
training batches), and the whole held-out split. Then, for each calibration size of the grid, the
candidate is recalibrated on exactly the sample `scoring_sets` would use for it (the same seeded
draw, in the same order and batches) and scored on the whole held-out split, keeping which images
it got right; a held-out size of the grid is the same fixed class-stratified subset `scoring_sets`
would take, so its top-1 is read off those hits without another pass. Each cell is Kendall's tau-b
(`scipy.stats.kendalltau`) of the candidates' top-1 at that size against the reference's.

The images are decoded once per setting (the union of the calibration samples, and the held-out
split) and every set is sliced from them; one candidate's score at the search's default sizes is
checked against `scoring_sets` + `score_on` decoding that set directly.

Settings: `digits`, glit_micro on scikit-learn's digits (1,150 training images in the split, 288
held out); `folder`, glit_pico on a generated 224-px ImageNet-layout folder (`glit_ray.synthetic`,
written once into OUT), whose training images are class-sorted on disk as ImageNet's are.

Rule: a cell (c batches, h images) is stable when it and every cell with at least as many
calibration batches and held-out images have tau >= THRESHOLD; the recommended sizes are the
stable cell that decodes and scores the fewest images per candidate (64 c + h).

    python bench/ranking_stability.py [--settings digits folder] [--digits-candidates 40] [--folder-candidates 24]
        [--calib 1 2 4 8 16] [--heldout 64 128 256 512 1000] [--threshold 0.9] [--record]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import ray
import torch
from scipy.stats import kendalltau

from glit_ray.arch import Architecture
from glit_ray.data import build_splits, labels_of, stratified_sample
from glit_ray.evaluator import CALIB_BATCH_SIZE, EVAL_BATCH_SIZE, SCORING_DEFAULTS, score_on, scoring_sets
from glit_ray.imagesets import CHUNK, ImageSet, calibration_indices, decode, heldout_indices
from glit_ray.scoring import recalibrate_bn
from glit_ray.space import SearchSpace
from glit_ray.supernet import load_supernet
from glit_ray.synthetic import write_imagefolder
from glit_ray.train_supernet import supernet_settings, train_supernet

from harness import publish

CPU = torch.device("cpu")
REFERENCE = "reference"
HALVES = 20  # random stratified half splits of the held-out set for its split-half agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits", "folder"], choices=["digits", "folder"])
    parser.add_argument("--calib", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="calibration batches of 64")
    parser.add_argument("--heldout", type=int, nargs="+", default=[64, 128, 256, 512, 1000],
                        help="held-out images (sizes at or over the split's are dropped; the whole split is always a column)")
    parser.add_argument("--threshold", type=float, default=0.9, help="Kendall tau a stable cell reaches")
    parser.add_argument("--seed", type=int, default=0, help="draws the candidates")
    parser.add_argument("--digits-candidates", type=int, default=40)
    parser.add_argument("--digits-epochs", type=int, default=10)
    parser.add_argument("--folder-candidates", type=int, default=24)
    parser.add_argument("--folder-epochs", type=int, default=2)
    parser.add_argument("--folder-classes", type=int, default=20)
    parser.add_argument("--folder-train-per-class", type=int, default=100, help="of which 20 %% are held out")
    parser.add_argument("--folder-reference-batches", type=int, default=None,
                        help="cap on the reference's calibration batches (default: every training image of the split)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes that decode the images")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ranking-stability"))
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sections, recommended = [], {}
    for name in args.settings:
        result = run_setting(name, args)
        sections.append(result["text"])
        recommended[name] = result["recommended"]
    ray.shutdown()
    lines = [f"**Recommended (calibration batches, held-out images) by the rule (tau >= {args.threshold:g}, see above): "
             + "; ".join(f"{SETTING_LABEL[n]}: {fmt_recommended(r)}" for n, r in recommended.items())
             + f".** Today's defaults: {', '.join(f'{k} {v}' for k, v in SCORING_DEFAULTS.items())}. "
             f"Whole run: {time.perf_counter() - started:.0f} s."]
    publish("P8", "\n\n".join([*sections, *lines]), args.record)


SETTING_LABEL = {"digits": "digits (glit_micro)", "folder": "224-px folder (glit_pico)"}


def run_setting(name: str, args) -> dict:
    """Train or reuse the setting's supernet, score its candidates at every size, and tabulate tau."""
    t0 = time.perf_counter()
    if name == "digits":
        space, data, epochs, batch, candidates, ref_cap = SearchSpace.load("glit_micro"), "digits", args.digits_epochs, 64, \
            args.digits_candidates, None
        about = "glit_micro on digits"
    else:
        space, epochs, batch, candidates = SearchSpace.load("glit_pico"), args.folder_epochs, 32, args.folder_candidates
        ref_cap = args.folder_reference_batches
        classes, per_class = args.folder_classes, args.folder_train_per_class
        root = args.out / f"folder-{classes}x{per_class}"
        if not (root / "done").exists():
            write_imagefolder(root, classes, per_class, 1, size=256, seed=0)  # val (the test split) is unused here
            (root / "done").touch()
        data = f"imagefolder:{root}"
        about = f"glit_pico on a generated folder of {classes} classes x {per_class} 256-px JPEGs (224-px crops)"
    supernet_dir = args.out / f"{name}-supernet-{epochs}ep"
    supernet = train_supernet(supernet_settings(space, "high", None, data, epochs, batch_size=batch), supernet_dir,
                              resume=(supernet_dir / "run.json").exists())
    trained = time.perf_counter() - t0
    net, _ = load_supernet(supernet)
    splits = build_splits(data, space.img_size, space.in_chans)
    n_train, labels = len(splits.calibration), labels_of(splits.heldout)
    n_heldout = len(labels)

    # Sizes: the grid's calibration sizes the split holds; the reference: every training image (or the cap).
    calib = sorted({c for c in args.calib if c * CALIB_BATCH_SIZE < n_train})
    ref_images = n_train if ref_cap is None else min(n_train, ref_cap * CALIB_BATCH_SIZE)
    heldout = sorted({h for h in args.heldout if h < n_heldout}) + [None]
    default_calib, default_heldout = SCORING_DEFAULTS[data.partition(":")[0]]

    # Decode once: the union of the calibration samples (as scoring_sets draws them) and the whole held-out split.
    t1 = time.perf_counter()
    samples = {c: calibration_indices(splits, c * CALIB_BATCH_SIZE) for c in calib}
    reference = random.Random(f"{args.seed}:reference").sample(calibration_indices(splits, ref_images), ref_images)
    union = sorted(set(reference).union(*samples.values()))
    pool = decode(splits, splits.calibration, union, args.workers)
    pool_x, pool_y = torch.cat([x for x, _ in pool.chunks]), torch.cat([y for _, y in pool.chunks])
    row = {index: r for r, index in enumerate(union)}

    def sliced(indices: list[int]) -> ImageSet:
        rows = [row[i] for i in indices]
        x, y = pool_x[rows], pool_y[rows]
        return ImageSet([(x[s:s + CHUNK], y[s:s + CHUNK]) for s in range(0, len(rows), CHUNK)], pool.mean, pool.std)

    calib_sets = {c: sliced(samples[c]) for c in calib}
    calib_sets[REFERENCE] = sliced(reference)
    heldout_set = decode(splits, splits.heldout, heldout_indices(splits, None), args.workers)
    subsets = {h: torch.tensor(heldout_indices(splits, h)) for h in heldout}
    decoded = time.perf_counter() - t1

    # Candidates: distinct high-level paths; per candidate and calibration row, its hits on the whole held-out split.
    rng, archs = random.Random(args.seed), []
    while len(archs) < min(candidates, space.size("high")):
        arch = space.sample("high", rng)
        if arch not in archs:
            archs.append(arch)
    t2 = time.perf_counter()
    hits = {key: [] for key in calib_sets}
    for i, arch in enumerate(archs):
        for key, calib_set in calib_sets.items():
            hits[key].append(held_out_hits(net, arch, calib_set, heldout_set))
        print(f"{name}: scored {i + 1}/{len(archs)} candidates ({time.perf_counter() - t2:.0f} s)", flush=True)
    scored = time.perf_counter() - t2

    def top1(key, h, positions=None) -> list[float]:
        positions = subsets[h] if positions is None else positions
        return [100.0 * float(hit[positions].float().mean()) for hit in hits[key]]

    truth = top1(REFERENCE, None)
    tau = {(c, h): kendalltau(top1(c, h), truth).statistic for c in [*calib, REFERENCE] for h in heldout}

    # The check: one candidate at the search's default sizes, decoded directly by scoring_sets and scored by score_on.
    check_calib = default_calib if default_calib in calib else calib[-1]
    check_heldout = max((h for h in heldout if h is not None), default=None)  # a stratified subset, when the grid has one
    direct = score_on(net, archs[0], scoring_sets(splits, check_calib, check_heldout, cluster=False, workers=args.workers), CPU)
    mine = top1(check_calib, check_heldout)[0]
    assert abs(direct["top1"] - mine) <= 100.0 / len(subsets[check_heldout]) + 1e-9, (direct["top1"], mine)

    # Free extras from the hits: the held-out split's own split-half agreement at the reference calibration, and
    # the held-out columns' tau over other stratified draws than the search's fixed one.
    halves, draws = [], {h: [] for h in heldout if h is not None}
    for s in range(HALVES):
        half = set(stratified_sample(labels, n_heldout // 2, seed=100 + s))
        a = torch.tensor(sorted(half))
        b = torch.tensor([p for p in range(n_heldout) if p not in half])
        halves.append(kendalltau(top1(REFERENCE, None, a), top1(REFERENCE, None, b)).statistic)
        for h in draws:
            draws[h].append(kendalltau(top1(REFERENCE, None, torch.tensor(stratified_sample(labels, h, seed=100 + s))),
                                       truth).statistic)

    stable = [(c, h) for c in calib for h in heldout
              if all(tau[(c2, h2)] >= args.threshold for c2 in calib if c2 >= c for h2 in heldout if size(h2) >= size(h))]
    cost = lambda cell: cell[0] * CALIB_BATCH_SIZE + min(size(cell[1]), n_heldout)  # noqa: E731
    best = min(stable, key=cost) if stable else None

    def h_label(h):
        return f"all {n_heldout}" if h is None else str(h)

    header = "| calibration \\ held-out | " + " | ".join(h_label(h) for h in heldout) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in heldout) + " |"
    rows = []
    for c in [*calib, REFERENCE]:
        label = (f"{c} x 64 = {c * CALIB_BATCH_SIZE}" if c != REFERENCE
                 else f"reference: all {ref_images} (random order)")
        cells = []
        for h in heldout:
            value = "1 (the reference)" if (c, h) == (REFERENCE, None) else f"{tau[(c, h)]:.3f}"
            cells.append(f"**{value}**" if (c, h) == best else value)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append("| reference calibration, mean ± std over 20 other held-out draws | "
                + " | ".join(f"{statistics.fmean(draws[h]):.3f} ± {statistics.stdev(draws[h]):.3f}" if h is not None else "-"
                             for h in heldout) + " |")
    spread = sorted(truth)
    sorted_on_disk = name == "folder"
    text = "\n".join([
        f"**{SETTING_LABEL[name]}**: {about}; supernet {epochs} epochs (batch {batch}); {len(archs)} high-level candidates; "
        f"{n_train} training images in the split, {n_heldout} held out. Reference top-1 of the candidates: "
        f"min {spread[0]:.1f} / median {statistics.median(spread):.1f} / max {spread[-1]:.1f} %. "
        f"Split-half agreement of the held-out split (tau between two disjoint stratified halves, reference calibration, "
        f"mean of {HALVES}): {statistics.fmean(halves):.3f}. Check: candidate 0 at ({check_calib}, {h_label(check_heldout)}) "
        f"through `scoring_sets` + `score_on` {direct['top1']:.2f} %, sliced {mine:.2f} %. "
        f"Seconds: supernet {trained:.0f}, decoding {decoded:.0f}, scoring {scored:.0f}."
        + (" The training images are class-sorted on disk, so `scoring_sets`' sample (sorted indices) gives batches of "
           "few classes once the sample is a large share of the split." if sorted_on_disk else ""), "",
        "Kendall tau of the candidates' top-1 against the reference (calibration rows: the sample `scoring_sets` draws "
        "at that size; columns: its class-stratified held-out subset):", "",
        header, rule, *rows, "",
        f"Stable by the rule at tau >= {args.threshold:g}: "
        + (f"**{best[0]} calibration batches, {h_label(best[1])} held-out images** ({cost(best)} images per candidate)."
           if best else "no cell of the grid."),
    ])
    return {"text": text, "recommended": None if best is None else (best[0], best[1], n_heldout)}


def size(h: int | None) -> float:
    return float("inf") if h is None else h


def fmt_recommended(r) -> str:
    if r is None:
        return "none of the grid"
    c, h, n = r
    return f"({c}, {'all' if h is None else h} of {n})"


@torch.no_grad()
def held_out_hits(net: torch.nn.Module, arch: Architecture, calib: ImageSet, heldout: ImageSet) -> torch.Tensor:
    """Which held-out images `arch` gets right (top-1, as `scoring.evaluate` counts it) after recalibrating on `calib`."""
    recalibrate_bn(net, arch, (x for x, _ in calib.batches(CALIB_BATCH_SIZE, CPU)))
    net.eval()
    hits = []
    for images, labels in heldout.batches(EVAL_BATCH_SIZE, CPU):
        logits = net(images, arch).float()
        hits.append(logits.topk(min(5, logits.shape[1]), dim=1).indices[:, 0] == labels)
    return torch.cat(hits)


if __name__ == "__main__":
    main()
