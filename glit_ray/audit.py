"""`python -m glit_ray.audit RUN_DIR`: how far a search's supernet can be trusted, in networks trained on their own.

A one-shot search is only as good as its supernet's ranking (`../shared/reference/supernet-trust.md`):
inherited weights must order architectures as training each one would. The audit trains a sample of
architectures on their own and sets their held-out top-1 beside their supernet top-1:

- `--sample N` from the search's ranking: its `--top K` always, the rest spread evenly over the ranks
  below them (the quantiles of the supernet's order, its last included);
- `--random M` drawn uniformly from the space inside the run's limits and within `--band` of the winner's
  FLOPs, scored by the supernet as the search scores (the same calibration and held-out images);
- where the space has them, the all-global network (the plain transformer) and the all-local one (pure
  convolution), at the level's sizes nearest the winner's FLOPs.

Each is trained `--seeds S` times (the ranking's networks but the winner `--ranking-seeds R` times, when given:
tau over many networks at one training each, the find against its rivals at S) for `--epochs E` with retraining's
recipe as Tune trials (`glit_ray.training.trials`: side by side over the cluster, resumable, the test split never
scored), and scored on the run's held-out split. Written into the search's run: RUN_DIR/audit/audit.parquet (one
row per trained network), audit.json (the verdict, `ranking.audit_verdict`), sample.json (the sample,
drawn once) and one training directory per trial with its TensorBoard curves.
`python -m glit_ray.report RUN_DIR` plots supernet against standalone top-1.
"""
from __future__ import annotations

import io
import random
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.resources import cluster_shape, evaluators
from glit_ray.core.cli import add_setting, ArgumentParser, run
from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_atomic, write_json
from glit_ray.core.progress import console as make_console
from glit_ray.models.arch import Architecture
from glit_ray.models.constraints import MAX_DRAWS, Limits
from glit_ray.models.cost import arch_cost
from glit_ray.runs import check_run, open_run, search_settings
from glit_ray.searching import ranking
from glit_ray.searching.dispatch import Dispatcher
from glit_ray.searching.evaluator import evaluator_pool
from glit_ray.searching.results import ranked_architectures
from glit_ray.searching.settings import SearchRun
from glit_ray.training.data import build_splits
from glit_ray.training.fit import ensure_ray
from glit_ray.training.flags import add_arguments, check_epoch_has_a_step, say_recipe, training_recipe
from glit_ray.training.settings import AuditRun
from glit_ray.training.trials import METRIC, Standalone, side_by_side, train_standalone

FOLDER, TABLE, RECORD, SAMPLE = "audit", "audit.parquet", "audit.json", "sample.json"
BASELINES = {"plain-transformer": "global", "convolution": "local"}  # group -> the kind of all its blocks
MIN_SAMPLE = 20  # below this a tau's 95 % interval spans most of -1..1
SCHEMA = pa.schema([
    ("arch", pa.string()), ("group", pa.string()), ("winner", pa.bool_()),
    ("supernet_top1", pa.float64()), ("supernet_loss", pa.float64()), ("supernet_rank", pa.int32()),
    ("standalone_top1", pa.float64()), ("standalone_loss", pa.float64()), ("epochs", pa.int32()), ("seed", pa.int32()),
    ("flops", pa.int64()), ("params", pa.int64()),
])


def default_sample(search: SearchRun, epochs: int, seeds: int, ranking_seeds: int, extra: int) -> int:
    """N such that the audit trains about as many epochs as the search's supernet trained paths (a path's step costs
    what its network's step costs, P1), and at least MIN_SAMPLE; `extra`: the random and baseline networks besides,
    which train `seeds` times like the winner, the rest of the sample `ranking_seeds` times."""
    return max(MIN_SAMPLE, (search.supernet_path_epochs // epochs - (extra + 1) * seeds) // ranking_seeds + 1)


def spread(ranked: int, sample: int, top: int) -> list[int]:
    """The ranks (0-based) of a sample of `sample` out of `ranked`: the first `top`, the rest evenly spaced over the
    ranks below them, the last included."""
    rest = sample - top
    if rest <= 0:
        return list(range(sample))
    if rest == 1:
        return [*range(top), ranked - 1]
    return [*range(top), *(top + round(i * (ranked - 1 - top) / (rest - 1)) for i in range(rest))]


def band_limits(limits: Limits, winner_flops: int, band: float) -> Limits:
    """The run's limits narrowed to `band` (a share) around the winner's FLOPs."""
    low, high = winner_flops * (1 - band) / 1e6, winner_flops * (1 + band) / 1e6
    return replace(limits, flops_min=max(low, limits.flops_min or low), flops_max=min(high, limits.flops_max or high))


def random_group(search: SearchRun, inside: Limits, count: int, taken: set[str], num_classes: int,
                 rng: random.Random) -> list[str]:
    """`count` distinct architectures drawn uniformly from the search's level inside `inside` (and its latency limit,
    when its table predicts latency), none in `taken`."""
    found: list[str] = []
    for _ in range(MAX_DRAWS):
        if len(found) == count:
            return found
        arch = search.space.sample(search.level, rng, search.distribution)
        if (str(arch) not in taken and str(arch) not in found and inside.admits(inside.cost(search.space, arch, num_classes))
                and (not search.latency_table or search.latency_table.allows(arch))):
            found.append(str(arch))
    if len(found) < count:
        raise UserError(f"{MAX_DRAWS} random draws from {search.space.name} found {len(found)} distinct architecture(s) "
                        f"inside the run's limits and the winner's FLOPs band ({inside}), not the {count} --random "
                        "asks for; widen --band or lower --random")
    return found


def baseline(search: SearchRun, kind: str, winner_flops: int, num_classes: int, rng: random.Random) -> str | None:
    """The network whose blocks are all of `kind` (global: the plain transformer; local: pure convolution) at the
    search level's sizes nearest the winner's FLOPs; None when the space has no such block."""
    space = search.space
    g = space.num_heads if kind == "global" else 0
    if g not in space.global_heads:
        return None
    distribution = (g,) * space.depth
    if search.level == "high":
        return str(Architecture(tuple(space.default_block(g) for _ in distribution)))
    draws = [space.sample("low", rng, distribution) for _ in range(MAX_DRAWS // 10)]
    return str(min(draws, key=lambda a: abs(arch_cost(space, a, num_classes, search.limits.convention).flops
                                            - winner_flops)))


def choose_sample(settings: AuditRun, search: SearchRun, ranked: list[dict], num_classes: int) -> list[dict]:
    """The networks the audit trains, each with its group, and its supernet top-1 and rank when the search scored
    it (None: the supernet scores it before training)."""
    if settings.sample > len(ranked):
        raise UserError(f"--sample {settings.sample} is more than the {len(ranked)} distinct architectures the search "
                        f"scored; give --sample {len(ranked)} or less")
    rank_of = {row["arch"]: i for i, row in enumerate(ranked)}
    chosen = [{"arch": ranked[i]["arch"], "group": "top" if i < settings.top else "quantile"}
              for i in spread(len(ranked), settings.sample, min(settings.top, settings.sample))]
    rng, winner_flops = random.Random(settings.seed), ranked[0]["flops"]
    inside = band_limits(search.limits, winner_flops, settings.band)
    taken = {row["arch"] for row in chosen}
    chosen += [{"arch": a, "group": "random"} for a in random_group(search, inside, settings.random, taken,
                                                                     num_classes, rng)]
    for group, kind in BASELINES.items():
        arch = baseline(search, kind, winner_flops, num_classes, rng)
        if arch is not None and arch not in {row["arch"] for row in chosen}:
            chosen.append({"arch": arch, "group": group})
    for row in chosen:
        cost = arch_cost(search.space, Architecture.parse(row["arch"]), num_classes, search.limits.convention)
        rank = rank_of.get(row["arch"])
        row.update(winner=rank == 0, flops=cost.flops, params=cost.params,
                   supernet_rank=None if rank is None else rank + 1,
                   supernet_top1=None if rank is None else ranked[rank]["top1"],
                   supernet_loss=None if rank is None else ranked[rank]["loss"])
    return chosen


def supernet_path(run_dir: Path, search: SearchRun) -> Path:
    path = Path(search.supernet) if search.supernet else run_dir / "supernet" / "supernet.pt"
    if not path.is_file():
        raise UserError(f"the supernet of {run_dir} is missing ({path}); the audit scores its random architectures "
                        "with it: run the search to its end first")
    return path


def supernet_scores(search: SearchRun, supernet: Path, splits, archs: list[str], where: Placement) -> dict[str, dict]:
    """The supernet's scores (top1, top5, loss) of each of `archs` that it holds, by an evaluator actor exactly as the
    search scores (BatchNorm recalibration on its calibration sample, then its held-out images)."""
    held = [a for a in archs if search.level == "high" or Architecture.parse(a).distribution == search.distribution]
    if not held:
        return {}
    scorer = evaluators(1, where.actors.gpus, 0, cluster_shape())
    with evaluator_pool(supernet.read_bytes(), splits, search.calib_batches, search.heldout_images, scorer,
                        flops_convention=search.limits.convention) as pool:
        scores = Dispatcher(pool).score(held)
    failed = [(arch, row["error"]) for arch, row in zip(held, scores) if row["status"] != "ok"]
    if failed:
        raise UserError(f"the supernet could not score {failed[0][0]} ({failed[0][1]}); the search's evaluators "
                        "scored its networks: is its supernet.pt the one it searched?")
    return dict(zip(held, scores))


def seeds_of(row: dict, settings: AuditRun) -> int:
    """How often the sample's network `row` trains: the winner, the random group and the baselines --seeds times,
    the ranking's other networks --ranking-seeds times when given."""
    ranked = row["group"] in ("top", "quantile") and not row["winner"]
    return settings.ranked_seeds if ranked else settings.seeds


def trials_of(sample: list[dict], settings: AuditRun) -> list[Standalone]:
    """One trial per network of the sample and seed, named aNNsS."""
    return [Standalone(f"a{j:02d}s{s}", row["arch"], settings.seed + s, f"({row['group']})")
            for j, row in enumerate(sample) for s in range(seeds_of(row, settings))]


def table_rows(sample: list[dict], trials: list[Standalone], results: list[dict]) -> list[dict]:
    """audit.parquet's rows: each trial's network as the sample describes it, with what its training scored."""
    by_arch = {row["arch"]: row for row in sample}
    return [{**{k: by_arch[t.arch][k] for k in ("arch", "group", "winner", "supernet_top1", "supernet_loss",
                                                 "supernet_rank", "flops", "params")},
             "standalone_top1": m[METRIC], "standalone_loss": m["heldout_loss"], "epochs": m["epoch"] + 1,
             "seed": t.seed} for t, m in zip(trials, results)]


def write_table(path: Path, rows: list[dict]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
    write_atomic(path, buffer.getvalue())


def read_table(path: Path) -> list[dict]:
    return pq.read_table(path, schema=SCHEMA).to_pylist()


def audit(settings: AuditRun, where: Placement, console=None) -> dict:
    """Audit the search in run dir `where.out` (or resume its audit, or find it finished); return audit.json."""
    console = console or make_console()
    run_dir, folder = where.out, where.out / FOLDER
    search = search_settings(run_dir)
    ranked = ranked_architectures(run_dir, search.objective)
    supernet = supernet_path(run_dir, search)
    splits = build_splits(search.data, search.space.img_size, search.space.in_chans)  # a bad dataset fails here
    check_epoch_has_a_step(len(splits.train), settings.batch_size, settings.workers)
    if check_run(folder, settings, where.resume) and (folder / RECORD).is_file():  # before Ray
        record = read_json(folder / RECORD)
        console.print(f"already audited ({folder / RECORD}):")
        for line in ranking.verdict_lines(record["verdict"]):
            console.print(line)
        return record
    fresh = choose_sample(settings, search, ranked, splits.num_classes)  # bad --sample or --band: before Ray
    ensure_ray(where.address)
    placed = side_by_side(FOLDER, settings, len(trials_of(fresh, settings)), where)  # or fits no node: before anything is written
    resumed = open_run(folder, settings, where.resume)
    if resumed and (folder / SAMPLE).is_file():
        sample = read_json(folder / SAMPLE)  # drawn once: the same trials whatever the search's files do since
    else:
        sample = fresh
        unscored = [row["arch"] for row in sample if row["supernet_top1"] is None]
        console.print(f"scoring {len(unscored)} architecture(s) the search did not score with its supernet")
        scores = supernet_scores(search, supernet, splits, unscored, where)
        for row in sample:
            if row["arch"] in scores:
                row.update(supernet_top1=scores[row["arch"]]["top1"], supernet_loss=scores[row["arch"]]["loss"])
        write_json(folder / SAMPLE, sample)
    trials = trials_of(sample, settings)
    say_recipe(settings, len(splits.train), console.print)
    groups = {g: sum(row["group"] == g for row in sample) for g in ("top", "quantile", "random", *BASELINES)}
    results = train_standalone(
        FOLDER, settings, trials, where, placed, resumed, console.print,
        f"audit of {run_dir}: {len(sample)} networks ({', '.join(f'{n} {g}' for g, n in groups.items() if n)}), "
        f"{ranking.seeds_said(settings.seeds, settings.ranked_seeds)} x {settings.epochs} epochs", epoch_lines=False)
    rows = table_rows(sample, trials, results)
    write_table(folder / TABLE, rows)
    verdict = ranking.audit_verdict(rows, settings.top, tuple(BASELINES), search.objective)
    record = {"run": str(run_dir), "epochs": settings.epochs, "seeds": settings.seeds,
              "ranking_seeds": settings.ranked_seeds, "band": settings.band,
              "verdict": verdict}
    write_json(folder / RECORD, record)
    for line in ranking.verdict_lines(verdict):
        console.print(line)
    console.print(f"audit: {folder / TABLE}, {folder / RECORD}; python -m glit_ray.report {run_dir} plots it")
    return record


def settings_from_args(args, run_dir: Path) -> AuditRun:
    """The audit's settings: the search's space and data, retraining's recipe, the sample's sizes."""
    if args.space or args.data:
        raise UserError("the audit trains on the search's own space and data; drop --space and --data")
    search = search_settings(run_dir)
    baselines = sum((search.space.num_heads if kind == "global" else 0) in search.space.global_heads
                    for kind in BASELINES.values())
    given = AuditRun(space=search.space, data=search.data, epochs=args.epochs, batch_size=args.batch_size,
                     workers=args.workers, recipe=training_recipe(args, search.data, search.space), seed=args.seed,
                     sample=args.sample or MIN_SAMPLE, top=args.top, random=args.random, band=args.band,
                     seeds=args.seeds, ranking_seeds=args.ranking_seeds)  # checked; then the sample sized from them
    return given if args.sample else replace(given, sample=default_sample(
        search, given.epochs, given.seeds, given.ranked_seeds, given.random + baselines))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m glit_ray.audit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished search run directory (high or low level)")
    parser.add_argument("--sample", type=int, default=None,
                        help="architectures from the search's ranking (default: as many as train, with the random and "
                             f"baseline ones, about the epochs of the search's supernet; at least {MIN_SAMPLE})")
    for flag, kind in (("--top", int), ("--random", int), ("--band", float), ("--seeds", int),
                       ("--ranking-seeds", int)):
        add_setting(parser, flag, AuditRun, type=kind)
    add_arguments(parser, AuditRun, from_run=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    where = Placement.from_args(args, out=args.run_dir)
    audit(settings_from_args(args, where.out), where)


if __name__ == "__main__":
    run(main)
