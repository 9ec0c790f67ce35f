"""What defines a search run: one level's evolution (`Evolution`, all the searcher is given), the supernet it trains
when given none, how candidates are scored and limited. Frozen dataclasses with their defaults and checks on them,
as Ray's `ScalingConfig`: the command line reads its defaults here, and a search that cannot run as given is refused
when it is built.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from glit_ray.core.cli import described, like
from glit_ray.core.errors import UserError
from glit_ray.models.constraints import Limits
from glit_ray.models.latency_table import TableLatency
from glit_ray.models.space import SearchSpace
from glit_ray.training.data import located
from glit_ray.training.imagesets import scoring_sizes
from glit_ray.training.recipe import Recipe
from glit_ray.training.settings import UNIFORM_EPOCHS, SupernetRun, default_epochs, paths_per_step, steps_per_epoch


@dataclass(frozen=True)
class Latency:
    """Latency measured on each evaluator's device: `batch` images per timed pass, candidates over `max_ms`
    rejected."""
    batch: int = described(1, "images per timed forward pass")
    max_ms: float | None = None

    def __post_init__(self):
        if self.max_ms is not None and self.max_ms <= 0:
            raise UserError(f"--latency-max-ms {self.max_ms:g} is not a positive time; give milliseconds above 0")
        if self.batch < 1:
            raise UserError("--latency-batch must be at least 1")


@dataclass(frozen=True)
class Evolution:
    """SPOS's evolution over one level of `space` (`glit_ray.searching.searcher`): generation 0 is `population`
    architectures inside `limits`, every later one breeds `mutations` + `crossovers` children of the `topk` best so
    far by `objective`, drawn from `seed`; `strategy="random"` draws every generation at random (the baseline)."""
    space: SearchSpace
    level: str
    distribution: tuple[int, ...] | None  # the low level's global heads per block; None at the high level
    limits: Limits
    population: int = described(50, "architectures of generation 0, drawn at random inside the limits")
    generations: int = described(20, "generations, generation 0 included")
    topk: int = described(10, "the parents of every later generation: the best K scored so far")
    mutations: int = described(25, "children bred by mutation in every later generation")
    crossovers: int = described(25, "children bred by uniform crossover in every later generation")
    mutation_prob: float = described(0.1, "each gene's probability of mutating")
    strategy: str = described("evolution", "random: the baseline, random architectures under the same budget and "
                                           "limits")
    objective: str = described("loss", "what parents and the best are chosen by: loss, held-out loss (ties: top-1; "
                                       "it orders networks as training them does better than top-1, BENCHMARKS.md "
                                       "P13b); top1, held-out top-1 (ties: loss); pareto, non-dominated rank and "
                                       "crowding over top-1 and --pareto-cost")
    pareto_cost: str = described("flops", "the cost axis of the Pareto front (latency: predicted by --latency-table, "
                                          "else measured, as --latency)")
    latency_table: TableLatency | None = None  # latency predicted on the target device, its limit applied in breeding
    seed: int = described(0, "seeds the evolution, and the supernet the search trains")

    def __post_init__(self):
        for name in ("population", "generations", "topk"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.topk > self.population:
            raise UserError(f"--topk {self.topk} is more than the --population {self.population} that generation 0 "
                            "scores and the first parents come from; lower --topk or raise --population")
        if self.mutations < 0 or self.crossovers < 0:
            raise UserError("--mutations and --crossovers count children: give 0 or more")
        if self.strategy == "evolution" and self.generations > 1 and self.mutations + self.crossovers == 0:
            raise UserError("--mutations 0 and --crossovers 0 breed no child after generation 0; give either, "
                            "or --generations 1")
        if not 0 <= self.mutation_prob <= 1:
            raise UserError(f"--mutation-prob {self.mutation_prob} is not a probability; give a value in 0..1")


@dataclass(frozen=True)
class SearchRun:
    """One level's evolutionary search (and the supernet it trains when it is given none). Its defaults are the
    command line's (`search.build_parser` reads them from here); a search that cannot run as given is refused when
    it is built, from the command line (one `error:` line) or from Python (a ValueError)."""
    space: SearchSpace
    level: str = "high"
    distribution: tuple[int, ...] | None = None  # the low level's global heads per block; None at the high level
    data: str = SupernetRun.data
    supernet: str | None = None  # a trained supernet.pt; None: the search trains one
    limits: Limits = Limits()
    calib_batches: int | None = None  # the scoring sets' sizes (None: the data set's, `imagesets.scoring_sizes`)
    heldout_images: int | None = None
    supernet_recipe: Recipe | None = None  # of the supernet the search trains (None: the one its data calls for)
    population: int = like(Evolution, "population")
    generations: int = like(Evolution, "generations")
    topk: int = like(Evolution, "topk")
    mutations: int = like(Evolution, "mutations")
    crossovers: int = like(Evolution, "crossovers")
    mutation_prob: float = like(Evolution, "mutation_prob")
    strategy: str = like(Evolution, "strategy")
    objective: str = like(Evolution, "objective")
    pareto_cost: str = like(Evolution, "pareto_cost")
    latency: Latency | None = None  # measured by the evaluators
    latency_table: TableLatency | None = None  # predicted from a table built on the target device
    supernet_epochs: int | None = described(None, "when training the supernet here: its epochs (default: the compute "
                                                  f"of {UNIFORM_EPOCHS} epochs of one path a step, see train_supernet "
                                                  "--epochs)")
    supernet_workers: int = described(SupernetRun.workers, "when training the supernet here: its data-parallel Ray "
                                                           "Train workers")
    seed: int = like(Evolution, "seed")
    supernet_sampling: str = described(SupernetRun.sampling, "when training the supernet here: its steps' paths "
                                                             "(see train_supernet --sampling); fair ones cover every "
                                                             "choice whatever the limits, which the search applies")

    def __post_init__(self):
        if self.level not in ("high", "low"):
            raise UserError(f"level {self.level!r} is not one of high, low")
        if self.latency and self.latency_table:
            raise UserError("--latency measures latency on the evaluators, --latency-table predicts it on the device "
                            "the table was built on; give one of them")
        if (self.level == "low") != (self.distribution is not None):
            raise UserError("--level low needs --distribution RUN_DIR (a high-level search run) or an ARCH_STRING"
                            if self.level == "low" else
                            "--distribution applies to --level low only; drop it for the high level")
        for name in ("calib_batches", "heldout_images", "supernet_epochs", "supernet_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        self.evolution  # noqa: B018  (its own checks)
        object.__setattr__(self, "data", located(self.data))  # (frozen) absolute: workers run elsewhere
        sizes = scoring_sizes(self.data, self.calib_batches, self.heldout_images)
        object.__setattr__(self, "calib_batches", sizes[0])
        object.__setattr__(self, "heldout_images", sizes[1])

    @property
    def supernet_path_epochs(self) -> int:
        """The compute of the supernet this search trains (or would train), in epochs of one path."""
        paths = paths_per_step(self.space, self.level, self.distribution, self.supernet_sampling)
        steps = steps_per_epoch(self.data, self.space, SupernetRun.batch_size, self.supernet_workers)
        return paths * (self.supernet_epochs or default_epochs(self.space, self.level, self.distribution,
                                                               self.supernet_sampling, steps))

    @property
    def evolution(self) -> Evolution:
        """What the searcher evolves: this run's evolution settings, nothing else of it."""
        return Evolution(**{f.name: getattr(self, f.name) for f in fields(Evolution)})
