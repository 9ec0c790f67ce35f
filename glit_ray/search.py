"""`python -m glit_ray.search --level high|low`: GLiT's hierarchical evolutionary search on Ray Tune.

The front door. With no `--supernet` it first trains the level's supernet (RUN_DIR/supernet),
then evolves architectures with `EvolutionSearcher`: one Tune trial per generation, whose
candidates are scored by `--actors` long-lived evaluator actors holding the supernet. Results go
to RUN_DIR/candidates/*.parquet (one row per candidate, with lineage), RUN_DIR/best.json and
RUN_DIR/tb. A supernet whose probes are no better than chance is not searched (`glit_ray.training.verdict`;
`--search-unlearnt` searches it anyway, and best.json says so). `--level low` takes the best G
distribution of a high-level run (`--distribution RUN_DIR`) and searches the block sizes. Kill it at any point and re-run with `--resume`.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from rich.console import Console
from rich.table import Table

from glit_ray.cluster import ray_workarounds
from glit_ray.cluster.mirror import Mirror, MirrorCallback
from glit_ray.cluster.placement import Placement
from glit_ray.cluster.resources import Request, cluster_shape, evaluators, plan, waiting_note
from glit_ray.cluster.storage import check_reachable
from glit_ray.core.cli import add_setting, ArgumentParser, callers_signal_handlers, run
from glit_ray.core.errors import UserError
from glit_ray.core.progress import bar, driver_has_terminal
from glit_ray.core.progress import console as make_console
from glit_ray.models.constraints import Limits, MAX_DRAWS, add_flops_convention, count_within
from glit_ray.models.latency_table import TableLatency
from glit_ray.models.space import LEVELS, SearchSpace
from glit_ray.models.supernet import load_supernet
from glit_ray.runs import RUN_FILE, check_run, open_run, resolve_distribution
from glit_ray.searching.dispatch import ACTOR_LOST, Dispatcher
from glit_ray.searching.evaluator import evaluator_pool
from glit_ray.searching.results import ResultsCallback, best_record, read_candidates, repair_generations
from glit_ray.searching.searcher import EvolutionSearcher
from glit_ray.searching.settings import Latency, SearchRun
from glit_ray.train_supernet import SAMPLING, supernet_run, train_supernet
from glit_ray.train_supernet import RECIPE_DEFAULTS as SUPERNET_RECIPE_DEFAULTS
from glit_ray.training.data import build_splits
from glit_ray.training.fit import ensure_ray
from glit_ray.training.flags import (add_training_placement, add_worker_resources, check_epoch_has_a_step, check_ingest,
                                     training_recipe)
from glit_ray.training.recipe import add_recipe_arguments
from glit_ray.training.settings import SupernetRun
from glit_ray.training.verdict import of_meta

COST_COLUMNS = {"flops": "flops", "latency": "latency_ms"}  # --pareto-cost -> the Parquet column it reads
SUPERNET_PREFIX = "supernet-"  # the recipe of the supernet a search trains: --supernet-recipe, --supernet-lr, ...

class GenerationTrial(tune.Trainable):
    """A Tune trial: score one generation's candidates on the evaluator actors.

    A class trainable, so that Tune reuses its process from generation to generation
    (`reuse_actors`) instead of starting a fresh one per trial (seconds each).
    """

    def setup(self, config: dict, actors: list, progress: bool):
        self.dispatcher, self.progress = Dispatcher(actors), progress

    def reset_config(self, new_config: dict) -> bool:
        return True

    def step(self) -> dict:
        candidates = self.config["candidates"]
        progress = bar(len(candidates), f"generation {self.config['generation']}", self.progress)
        scores = self.dispatcher.score([c["arch"] for c in candidates], progress)
        progress.close()
        rows = [{**candidate, **score} for candidate, score in zip(candidates, scores)]
        best = max((r["top1"] for r in rows if r["status"] == "ok"), default=float("nan"))
        return {"generation": self.config["generation"], "rows": rows, "top1": best, "done": True,
                "node": ray.get_runtime_context().get_node_id()}


def trial_dirname(trial) -> str:
    return f"gen-{trial.config['generation']:04d}-{trial.trial_id}"


def generation_tuner(out: Path, searcher: EvolutionSearcher, evaluators: list, callbacks: list[tune.Callback],
                     restore: bool) -> tune.Tuner:
    """The Tuner running `searcher`'s generations, one reused trial each, on `evaluators`.

    With `restore`, Tune's snapshot in RUN_DIR/tune (the searcher's state with it) is picked up
    where it stopped; otherwise a fresh one.
    """
    # the trial only feeds the evaluators: it runs on the head node, beside the driver, so that losing a worker node
    # (a spot instance) never costs it a restart; Ray gives the head node this resource (Serve pins its controller so).
    # It asks for no CPU, so that it also runs on a head node that offers none (num-cpus 0, KubeRay's advice)
    trainable = tune.with_resources(tune.with_parameters(GenerationTrial, actors=evaluators, progress=driver_has_terminal()),
                                    {"cpu": 0, ray_workarounds.HEAD_NODE_RESOURCE: 0.001})
    if restore:
        try:
            return tune.Tuner.restore(str(out / "tune"), trainable, resume_unfinished=True, resume_errored=True)
        except (ModuleNotFoundError, AttributeError) as exc:  # it pickles our classes by their module paths
            raise UserError(f"{out / 'tune'}: Tune's snapshot names code this glit_ray does not have ({exc}): it was "
                            "written by another version; finish the search with that version, or start it again in a "
                            "new --out") from None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=1,
                                    reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                                  callbacks=[*callbacks, JsonLoggerCallback()]),
    )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m glit_ray.search", description=__doc__.splitlines()[0])
    p.add_argument("--level", required=True, choices=LEVELS)
    p.add_argument("--space", default="glit_micro", help="YAML path or built-in name (default: glit_micro)")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | cifar100:PATH | imagefolder:PATH")
    p.add_argument("--supernet", type=Path, help="a trained supernet.pt (default: train one into RUN_DIR/supernet)")
    p.add_argument("--distribution", help="low level: ARCH_STRING or a high-level search RUN_DIR")
    for flag in ("--population", "--generations", "--topk", "--mutations", "--crossovers"):
        add_setting(p, flag, SearchRun, type=int)
    add_setting(p, "--mutation-prob", SearchRun, type=float)
    add_setting(p, "--strategy", SearchRun, choices=("evolution", "random"))
    add_setting(p, "--objective", SearchRun, choices=("loss", "top1", "pareto"))
    add_setting(p, "--pareto-cost", SearchRun, choices=tuple(COST_COLUMNS))
    p.add_argument("--latency-table", type=Path, metavar="TABLE.json",
                   help="predict each candidate's latency from this table, built on the device the model will run on "
                        "(python -m glit_ray.latency_table); --latency-max-ms then rejects candidates as they are bred")
    p.add_argument("--latency", action="store_true", help="measure each candidate's latency on its evaluator's device")
    p.add_argument("--latency-max-ms", type=float, help="reject candidates slower than this: predicted by "
                                                        "--latency-table, else measured (implies --latency)")
    add_setting(p, "--latency-batch", Latency, "batch", type=int)
    for bound in ("flops-min", "flops-max"):
        p.add_argument(f"--{bound}", type=float, help="in millions, counted in --flops-convention")
    for bound in ("params-min", "params-max"):
        p.add_argument(f"--{bound}", type=float, help="in millions")
    add_flops_convention(p)
    p.add_argument("--actors", type=int, default=None,
                   help="evaluator actors (default: one per GPU up once the supernet is trained, else 2)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each evaluator asks for (default: 1 where the cluster has or can add GPU nodes, else 0)")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="BatchNorm is recalibrated on this many batches of 64 training images drawn at random "
                        "(default: per data set, see the README)")
    p.add_argument("--heldout-images", type=int, default=None,
                   help="score on a fixed class-stratified subset of N held-out images (default: per data set)")
    add_setting(p, "--supernet-epochs", SearchRun, type=int)
    add_setting(p, "--supernet-sampling", SearchRun, choices=SAMPLING)
    add_setting(p, "--supernet-workers", SearchRun, type=int)
    p.add_argument("--search-unlearnt", action="store_true",
                   help="search the supernet even when its probes are no better than chance (glit_ray.training.verdict); "
                        "the console and best.json say so")
    add_worker_resources(p, who="supernet worker")
    add_training_placement(p)
    p.add_argument("--address", default=None, help="an existing Ray cluster (auto or ray://...); default: start one")
    add_setting(p, "--seed", SearchRun, type=int)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/search-LEVEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--mirror", help="push the run directory here after every generation (s3://bucket/prefix); "
                                    "with --resume and no local copy, pull it from here first")
    add_recipe_arguments(p, prefix=SUPERNET_PREFIX, **SUPERNET_RECIPE_DEFAULTS)
    return p


def settings_from_args(args) -> SearchRun:
    """Validate the command line into the settings that define a search run (stored in run.json)."""
    space = SearchSpace.load(args.space)
    if args.level == "low" and not args.distribution:  # (before resolving it, which reads the run it names)
        raise UserError("--level low needs --distribution RUN_DIR (a high-level search run) or an ARCH_STRING")
    if args.level == "high" and args.distribution:
        raise UserError("--distribution applies to --level low only; drop it for the high level")
    distribution = resolve_distribution(args.distribution, space) if args.level == "low" else None
    table = TableLatency.load(args.latency_table, space, args.latency_max_ms) if args.latency_table else None
    latency = Latency(args.latency_batch, None if table else args.latency_max_ms)  # (checked even if not measured)
    if table and args.latency_batch != table.table["batch"]:
        raise UserError(f"--latency-batch {args.latency_batch} does not apply to {args.latency_table}, timed at batch "
                        f"{table.table['batch']}; drop --latency-batch, or build a table with "
                        f"`python -m glit_ray.latency_table --batch {args.latency_batch}`")
    measured = args.latency or (not table and (args.latency_max_ms is not None or args.pareto_cost == "latency"))
    # checked as given, before the data set is read for the recipe that depends on it
    given = SearchRun(
        space=space, level=args.level, distribution=distribution, data=args.data,
        supernet=str(args.supernet.resolve()) if args.supernet else None,
        limits=Limits(args.flops_min, args.flops_max, args.params_min, args.params_max, args.flops_convention),
        calib_batches=args.calib_batches, heldout_images=args.heldout_images, supernet_recipe=None,
        population=args.population, generations=args.generations, topk=args.topk, mutations=args.mutations,
        crossovers=args.crossovers, mutation_prob=args.mutation_prob, strategy=args.strategy, objective=args.objective,
        pareto_cost=COST_COLUMNS[args.pareto_cost],
        latency=latency if measured else None, latency_table=table,
        supernet_epochs=args.supernet_epochs, supernet_workers=args.supernet_workers, seed=args.seed,
        supernet_sampling=args.supernet_sampling)
    recipe = None if args.supernet else training_recipe(args, given.data, space, SupernetRun.batch_size,
                                                         SUPERNET_PREFIX, **SUPERNET_RECIPE_DEFAULTS)
    return replace(given, supernet_recipe=recipe)


def supernet_settings(settings: SearchRun) -> SupernetRun:
    """The supernet a search without `--supernet` trains: uniform paths inside its limits' maxima (a path over them
    is never searched), or fair ones, which cover every choice whatever the limits (the search applies them)."""
    limits = settings.limits
    return supernet_run(settings.space, settings.level, settings.distribution, settings.data, settings.supernet_epochs,
                        workers=settings.supernet_workers, recipe=settings.supernet_recipe,
                        limits=replace(limits, flops_min=None, params_min=None) if settings.supernet_sampling == "uniform"
                        else Limits(convention=limits.convention), seed=settings.seed,
                        sampling=settings.supernet_sampling)


def check_supernet(path: Path, space: SearchSpace, level: str, distribution) -> None:
    net, _ = load_supernet(path)
    if net.space != space:
        raise UserError(f"supernet {path} was trained on space {net.space.name}, not this search's {space.name}; "
                        "pass the matching --space or another --supernet")
    if net.level != level:
        raise UserError(f"supernet {path} is a {net.level}-level supernet; the {level}-level search needs its own")
    if level == "low" and tuple(net.distribution) != tuple(distribution):
        raise UserError(f"supernet {path} was trained for distribution {net.distribution}, not {tuple(distribution)}")


def learnt_or_refused(supernet: Path, anyway: bool, console: Console) -> dict:
    """The supernet's verdict (`glit_ray.training.verdict`) as best.json records it; a supernet that has not learnt, or whose
    file keeps no probes, stops the search (UserError) unless `anyway` (--search-unlearnt), which the console says."""
    _, meta = load_supernet(supernet)
    verdict = of_meta(meta)
    if verdict is not None and verdict.learnt:
        console.print(f"supernet: learnt: {verdict.evidence()}")
        return {**verdict.as_dict(), "searched_unlearnt": False}
    problem = (f"the supernet {supernet} has not learnt: {verdict.evidence()}" if verdict else
               f"the supernet {supernet} keeps no probe scores (saved by hand or by an older glit_ray), so whether it "
               "has learnt is unknown")
    if not anyway:
        raise UserError(f"{problem}; train it longer (more --supernet-epochs) or with another recipe (--supernet-recipe, "
                        "--supernet-lr) in a new --out, or run the same command with --search-unlearnt to search it "
                        "anyway")
    console.print(f"searching anyway (--search-unlearnt): {problem}; its ranking is noise")
    return {**(verdict.as_dict() if verdict else {"learnt": None}), "searched_unlearnt": True}


def check_search(settings: SearchRun, splits) -> None:
    """What makes a search impossible on its data, refused before Ray starts: limits no architecture meets, fewer
    architectures inside them than a generation, a supernet of another space or level, an epoch without a step."""
    space, level, limits = settings.space, settings.level, settings.limits
    limits.check_feasible(space, level, splits.num_classes, settings.distribution)
    if settings.latency_table:
        settings.latency_table.check_fits(space, level, splits.num_classes, settings.distribution)
        check_draws_meet(settings, splits.num_classes)
    inside = count_within(limits, space, level, splits.num_classes, settings.distribution)
    if inside is not None and inside < settings.population:
        raise UserError(f"only {inside} architecture(s) of {space.name} ({level} level) meet {limits}, fewer than "
                        f"--population {settings.population}: generation 0 cannot fill; widen the limits or lower "
                        "--population")
    if settings.supernet:
        check_supernet(Path(settings.supernet), space, level, settings.distribution)
    else:
        check_epoch_has_a_step(len(splits.train), SupernetRun.batch_size, settings.supernet_workers,
                               "lower --supernet-workers, or train one with python -m glit_ray.train_supernet "
                               "--batch-size N and give it as --supernet")


def check_draws_meet(settings: SearchRun, num_classes: int) -> None:
    """Refuse FLOPs/params limits and a latency limit that each leave architectures but none together (as far as
    MAX_DRAWS random draws tell)."""
    space, limits, latency, rng = settings.space, settings.limits, settings.latency_table, random.Random(settings.seed)
    for _ in range(MAX_DRAWS):
        arch = space.sample(settings.level, rng, settings.distribution)
        if limits.admits(limits.cost(space, arch, num_classes)) and latency.allows(arch):
            return
    raise UserError(f"none of {MAX_DRAWS} random architectures of {space.name} meets both {limits} and "
                    f"--latency-max-ms {latency.max_ms:g} by {latency.path}; raise the latency limit or widen the "
                    "FLOPs/params limits")


def requests(settings: SearchRun, where: Placement) -> tuple[Request | None, Request]:
    """What the search asks of the cluster: the supernet's Ray Train workers (None: it is given one) and the
    evaluator actors; each checked against the cluster's node types and its storage, before anything is written."""
    shape = cluster_shape()  # read once: on KubeRay it is a request to the API server
    trainers = None if settings.supernet else plan("supernet", settings.supernet_workers, where.workers.gpus,
                                                   where.workers.cpus, shape=shape)
    if trainers:
        check_ingest(where.workers.ingest, trainers, shape)
        check_reachable(f"{where.mirror.rstrip('/')}/supernet" if where.mirror else where.out / "supernet", "--mirror",
                        shape)
    if where.mirror:
        check_reachable(where.mirror, "--mirror", shape)  # what outlives the head node
    scorers = evaluators(where.actors.count, where.actors.gpus, trainers.count * trainers.gpus if trainers else 0, shape)
    return trainers, scorers


def search(settings: SearchRun, where: Placement, console: Console | None = None, search_unlearnt: bool = False) -> dict:
    """Run (or resume) a search; returns best.json's content.

    `search_unlearnt` (--search-unlearnt) searches a supernet whose verdict is that it has not learnt, and best.json
    says so. It is not one of the run's settings: a search refused for its supernet resumes with it, the trained
    supernet kept.

    `where.actors` asks for the evaluators, `where.workers` for the supernet's Ray Train workers when the search
    trains it (`resources.plan`).

    With `where.mirror` (a storage URI), the run directory is pushed there after every generation, and
    the supernet's Ray Train checkpoints go there directly; resuming without a local copy (a new
    head node) pulls it back first.
    """
    console = console or make_console()
    out, space = where.out, settings.space
    mirror = Mirror(out, where.mirror) if where.mirror else None
    pulling = mirror and where.resume and not (out / RUN_FILE).exists()  # run.json is in the mirror, pulled below
    splits = build_splits(settings.data, space.img_size, space.in_chans)  # a bad dataset fails before Ray
    check_search(settings, splits)
    if not pulling:
        check_run(out, settings, where.resume)  # a run dir that is not this run's is refused before Ray starts
    if settings.supernet:  # a given supernet's verdict, before anything is written
        about = {"supernet": learnt_or_refused(Path(settings.supernet), search_unlearnt, console)}
    ensure_ray(where.address)  # what the cluster can hold is known before anything is written
    trainers, scorers = requests(settings, where)
    if pulling:
        console.print(f"pulled {mirror.pull()} files of the run from {mirror.uri} into {out}")
    resumed = open_run(out, settings, where.resume)

    supernet = Path(settings.supernet) if settings.supernet else train_supernet(
        supernet_settings(settings),
        replace(where, out=out / "supernet", resume=(out / "supernet" / RUN_FILE).exists(),
                workers=replace(where.workers, gpus=trainers.gpus, cpus=trainers.cpus),
                storage=f"{mirror.uri.rstrip('/')}/supernet" if mirror else None),
        console=console, splits=splits)
    if mirror:
        mirror.push()
    if not settings.supernet:
        about = {"supernet": learnt_or_refused(supernet, search_unlearnt, console)}

    with evaluator_pool(supernet.read_bytes(), splits, settings.calib_batches, settings.heldout_images, scorers,
                        settings.latency, settings.limits.convention) as pool, waiting_note(scorers, console.print):
        searcher = EvolutionSearcher(settings.evolution, splits.num_classes)
        loads = run_generations(settings, searcher, pool, scorers, out, about, resumed, mirror, console)
    if mirror:
        mirror.push()
    return best_of(settings, out, about, loads, console)


def run_generations(settings: SearchRun, searcher: EvolutionSearcher, pool: list, scorers: Request, out: Path,
                    about: dict, resumed: bool, mirror: Mirror | None, console: Console) -> list:
    """The search's generations on the evaluator actors `pool` (asked for as `scorers`), one Tune trial each,
    resumed from Tune's snapshot when there is one; the supernet loads of each actor afterwards."""
    restore = resumed and tune.Tuner.can_restore(str(out / "tune"))  # a kill before Tune's first snapshot left none
    if restore:
        console.print(f"resuming the {settings.level}-level search in {out}")
        searcher.restore_from_dir(str(out / "tune"))  # Tuner.restore restores it again, from the same file
        for line in repair_generations(out, searcher.state["scored"], settings.level):
            console.print(line)
    else:
        console.print(f"{settings.level}-level search of {settings.space.name} on {settings.data}: "
                      f"{settings.generations} generations -> {out}")
        if settings.latency_table:
            limit = settings.latency_table.max_ms
            console.print(f"latency predicted by {settings.latency_table.path} ({settings.latency_table.about})"
                          + (f"; candidates over {limit:g} ms are not bred" if limit is not None else ""))
    console.print(str(scorers))
    callbacks = [ResultsCallback(out, settings.level, settings.topk, settings.generations, settings.pareto_cost, about,
                                 settings.objective)]
    if mirror:
        callbacks.append(MirrorCallback(mirror))  # after the results callback: pushes what it wrote
    with callers_signal_handlers():
        generation_tuner(out, searcher, pool, callbacks, restore).fit()
    return supernet_loads(pool)


def best_of(settings: SearchRun, out: Path, about: dict, loads: list, console: Console) -> dict:
    """best.json's record of the finished search (the run's candidates, read back), printed as the top-k table."""
    rows = read_candidates(out).to_pylist()
    level = settings.level
    best = best_record(rows, level, settings.topk, settings.pareto_cost, settings.objective)
    if best is None:
        raise UserError(f"no candidate of {out} was scored successfully; see the error column of {out}/candidates")
    best.update(about)
    print_table(console, f"top-{len(best['topk'])} of {len(rows)} candidates ({level} level)", best["topk"])
    if settings.objective == "pareto":
        print_table(console, f"Pareto front over top-1 and {best['front_cost']}", best["front"])
    console.print(f"best: {best['arch']}  top-1 {best['top1']:.2f}%  ({out / 'best.json'}); "
                  f"supernet loads per actor: {loads}")
    return best


def supernet_loads(actors: list) -> list:
    """Supernet loads of each actor's process (1 unless something is wrong), or 'down' if it does not answer."""
    pings = [actor.stats.remote() for actor in actors]
    # the search is over, so a live actor is idle and answers in milliseconds; one whose node is gone never does
    answered, _ = ray.wait(pings, num_returns=len(pings), timeout=2)
    loads = []
    for ping in pings:
        try:
            loads.append(ray.get(ping)["loads"] if ping in answered else "down")
        except ACTOR_LOST:
            loads.append("down")
    return loads


def print_table(console: Console, title: str, rows: list[dict]) -> None:
    latency = any(r["latency_ms"] is not None for r in rows)
    columns = ["#", "architecture", "top-1 %", "top-5 %", "MFLOPs", "M params", *(["ms"] if latency else []), "gen", "operator"]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "architecture" else "right",
                         overflow="fold" if column == "architecture" else "ellipsis")
    for rank, row in enumerate(rows, 1):
        table.add_row(str(rank), row["arch"], f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['flops'] / 1e6:.2f}",
                      f"{row['params'] / 1e6:.3f}", *([f"{row['latency_ms']:.3g}"] if latency else []),
                      str(row["generation"]), row["operator"])
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray_workarounds.apply()
    search(settings_from_args(args), Placement.from_args(args, out=args.out or Path("runs") / f"search-{args.level}"),
           search_unlearnt=args.search_unlearnt)


if __name__ == "__main__":
    run(main)
