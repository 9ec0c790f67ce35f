"""Run directories: telling a resumable run from a different one.

Every run directory holds `run.json`, the settings that define the run (`SearchRun`, `SupernetRun`, `RetrainRun`,
`ShortlistRun`, `AuditRun`). Running again into the same directory with the same settings resumes it; different
settings are refused, so nothing a run wrote is ever overwritten by another. run.json holds `to_json(settings)`;
`from_json` is the one way back, and refuses a key it does not know.
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import asdict, fields
from typing import Any

from glit_ray.core.errors import UserError
from glit_ray.core.files import read_json, write_json
from glit_ray.core.progress import console
from glit_ray.models.arch import Architecture
from glit_ray.models.constraints import Limits
from glit_ray.models.latency_table import TableLatency
from glit_ray.models.space import SearchSpace
from glit_ray.searching.settings import Latency, SearchRun
from glit_ray.training.recipe import Recipe
from glit_ray.training.settings import AuditRun, RetrainRun, ShortlistRun, SupernetRun

RUN_FILE = "run.json"
KINDS = {"search": SearchRun, "supernet": SupernetRun, "retrain": RetrainRun, "shortlist": ShortlistRun,
         "audit": AuditRun}
# fields stored in JSON as something else: (to JSON, from JSON)
_STORED = {
    "space": (SearchSpace.to_dict, lambda value: SearchSpace.from_dict(value, source="run.json")),
    "limits": (Limits.as_dict, lambda value: Limits(**value)),
    "distribution": (list, tuple),
    "recipe": (asdict, lambda value: Recipe(**value)),
    "supernet_recipe": (asdict, lambda value: Recipe(**value)),
    "latency": (lambda latency: {"batch": latency.batch, "max_ms": latency.max_ms}, lambda value: Latency(**value)),
    "latency_table": (asdict, lambda value: TableLatency(**value)),  # the table itself: a resume needs no file
}


def kind_of(settings) -> str:
    return next(kind for kind, cls in KINDS.items() if type(settings) is cls)


def to_json(settings) -> dict[str, Any]:
    """`settings` as run.json holds them."""
    stored = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        stored[f.name] = _STORED[f.name][0](value) if f.name in _STORED and value is not None else value
    return stored


# fields added since the release before training recipes (2291a49), with what a run file without them meant
# (a supernet trained before fair sampling, a search's included, was sampled uniformly; a search before latency
# tables predicted none; an audit before --ranking-seeds trained every network --seeds times)
ADDED = {"supernet_recipe": None, "sampling": "uniform", "supernet_sampling": "uniform", "latency_table": None,
         "ranking_seeds": None}


def from_json(kind: str, stored: dict, source: str = "run.json"):
    """The settings of a `kind` run from what run.json holds; a key it does not know or lacks is refused in one line.

    A search's run file from before training recipes reads with ADDED's values (its space and data still serve
    retraining and the shortlist; resuming it is refused as a different run). A training run's from then (an `lr`
    and no `recipe`) trained with a recipe this version cannot repeat, and is refused."""
    cls = KINDS[kind]
    if "recipe" in {f.name for f in fields(cls)} and "lr" in stored and "recipe" not in stored:
        raise UserError(f"{source}: this {kind} run was written before training recipes (it has 'lr' and no "
                        "'recipe'), and this glit_ray cannot resume its training as it was; start the run in a new --out")
    stored = {**{k: v for k, v in ADDED.items() if k in {f.name for f in fields(cls)}}, **stored}
    names = [f.name for f in fields(cls)]
    unknown = [key for key in stored if key not in names]
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} in the {kind} settings (known: {', '.join(names)}); "
                        "fix it or start the run in a new --out")
    missing = [name for name in names if name not in stored]
    if missing:
        raise UserError(f"{source}: the {kind} settings lack {missing[0]!r}; it was written by another glit_ray "
                        "version or edited; start the run in a new --out")
    try:
        return cls(**{name: _STORED[name][1](value) if name in _STORED and value is not None else value
                      for name, value in stored.items()})
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: the {kind} settings do not read ({exc}); start the run in a new --out") from None


def check_run(out: Path, settings, resume: bool) -> bool:
    """Whether `out` resumes an earlier run with `settings` (False: a new run goes there), reading only.

    Refuses (UserError) an `out` that holds another run, or `--resume` of a directory that holds none: a command
    checks its run directory before it starts Ray, and claims it (`open_run`) once it knows the cluster can hold it.
    """
    kind, run_file = kind_of(settings), out / RUN_FILE
    if not run_file.exists():
        if resume:
            raise UserError(f"--resume: {out} is not a glit_ray run (no {RUN_FILE}); drop --resume to start one")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and is not a glit_ray run; choose a new --out")
        return False
    existing = read_json(run_file)
    if (found := kind_in(existing)) != kind:
        raise UserError(f"{out} holds a {found} run, not a {kind} run; choose another --out")
    previous = settings_in(existing, kind, run_file)
    old, new = to_json(previous), to_json(settings)
    changed = [name for name in new if old[name] != new[name]]
    if changed:
        diff = "; ".join(differences(previous, settings, name) for name in changed[:3])
        raise UserError(f"{out} holds a different {kind} run ({diff}); choose another --out or repeat its settings")
    return True


def differences(old, new, name: str) -> str:
    """How field `name` of two runs' settings differs: a recipe by the flags that differ, anything else by value."""
    before, after = getattr(old, name), getattr(new, name)
    if isinstance(before, Recipe) and isinstance(after, Recipe):
        return ", ".join(before.differences(after, prefix="supernet-" if name == "supernet_recipe" else ""))
    if isinstance(before, Recipe) or isinstance(after, Recipe):
        return f"{name}: {getattr(before, 'preset', before)} -> {getattr(after, 'preset', after)}"
    return f"{name}: {to_json(old)[name]!r} -> {to_json(new)[name]!r}"


def open_run(out: Path, settings, resume: bool) -> bool:
    """Claim `out` for a run with `settings` (`check_run`, then run.json written for a new run); return True when it
    resumes an earlier one."""
    resumed = check_run(out, settings, resume)
    if not resumed:
        write_json(out / RUN_FILE, {"kind": kind_of(settings), "settings": to_json(settings)})
    return resumed


def read_settings(run_file: Path, kind: str):
    """The settings of the `kind` run whose run.json is `run_file` (`settings.from_json`)."""
    return settings_in(read_json(run_file), kind, run_file)


def kind_in(existing: Any) -> str | None:
    """The kind of run a run.json's content `existing` records (None: not a run file's mapping)."""
    return existing.get("kind") if isinstance(existing, dict) else None


def settings_in(existing: Any, kind: str, run_file: Path):
    """The settings of the `kind` run in `existing`, what `run_file` (a run.json) holds."""
    if kind_in(existing) != kind or not isinstance(existing.get("settings"), dict):
        raise UserError(f"{run_file} is not the run file of a {kind} run")
    return from_json(kind, existing["settings"], source=str(run_file))


def search_settings(run_dir: Path, level: str | None = None):
    """The settings of the search run in `run_dir` (of `level`, when given), or a UserError saying it is none."""
    run_file, which = run_dir / RUN_FILE, f"{level}-level search" if level else "search"
    command = f"python -m glit_ray.search{f' --level {level}' if level else ''}"
    if not run_file.is_file():
        raise UserError(f"{run_dir} is not a glit_ray search run (no {RUN_FILE}); give the RUN_DIR of a {which}")
    existing = read_json(run_file)
    search = settings_in(existing, "search", run_file) if kind_in(existing) == "search" else None
    if search is None or level not in (None, search.level):
        raise UserError(f"{run_dir} is not a {which} run; give the RUN_DIR of {command}")
    return search


def resolve_distribution(value: str, space: SearchSpace) -> tuple[int, ...]:
    """The G distribution named by `--distribution`; for a run directory, a console line says where it came from.

    `value` is an architecture string (only its G's count, so `3:-0:-1:...` will do) or a high-level
    search run directory: the winner of its shortlist (`glit_ray.shortlist`) when it has one, else
    the search's best architecture."""
    path = Path(value)
    if not path.is_dir():
        return space.validate_distribution(Architecture.parse(value).distribution)
    best, shortlisted = path / "best.json", path / "shortlist.json"
    if not best.is_file():
        raise UserError(f"--distribution {path}: not a high-level search run (no best.json); run the high-level search first")
    record = read_json(best)
    if record.get("level") != "high" or "arch" not in record:
        raise UserError(f"--distribution {path}: best.json is not from a high-level search")
    if shortlisted.is_file():
        winner = read_json(shortlisted).get("winner") or {}
        if "arch" not in winner:
            raise UserError(f"--distribution {path}: {shortlisted} names no winner; run python -m glit_ray.shortlist again")
        arch = winner["arch"]
        source = (f"distribution from the shortlist of {path}: {arch} (held-out top-1 "
                  f"{winner['shortlist_top1']:.2f}% after {winner['epochs']} epoch(s) of training)")
    else:
        arch = record["arch"]
        source = f"distribution from {path}: its search's best, {arch} (no shortlist; python -m glit_ray.shortlist makes one)"
    distribution = space.validate_distribution(Architecture.parse(arch).distribution)
    console().print(source)
    return distribution
