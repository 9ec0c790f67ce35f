"""GLiT search spaces: loading and validating `search_spaces/*.yaml`, and the search operators.

A space fixes the network's skeleton (embedding, depth, heads, patch, image size) and lists, per
block kind, the low-level choices. A block's kind follows from its global-head count G:
`local` (G = 0), `mixed` (0 < G < H) or `global` (G = H). The two search levels see different genes:

- high level: one gene per block, G, drawn from `global_heads`; sizes sit at the kind's `defaults`;
- low level: G is fixed by a distribution; one gene per block, its low-level option (the product
  of the kind's choice lists, 9 options in the paper's spaces).

Both levels reduce to "one tuple of allowed Blocks per position", so sampling, mutation and
crossover are written once over `block_choices`.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture, Block

LEVELS = ("high", "low")
KIND_FIELDS = {
    "local": ("kernel", "conv_expansion", "mlp_ratio"),
    "mixed": ("kernel", "conv_expansion", "attn_expansion", "mlp_ratio"),
    "global": ("attn_expansion", "mlp_ratio"),
}
_SKELETON = ("name", "embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans")
_TOP_KEYS = _SKELETON + ("global_heads", "blocks", "defaults")


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise UserError(f"unknown level {level!r}: use 'high' (G distribution) or 'low' (block sizes)")
    return level


@dataclass(frozen=True, eq=False)
class SearchSpace:
    """A validated GLiT search space. Build it with `SearchSpace.load` or `from_dict`."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    in_chans: int
    global_heads: tuple[int, ...]
    choices: dict[str, dict[str, tuple]]  # kind -> field -> allowed values
    defaults: dict[str, dict[str, Any]]  # kind -> field -> value the high level holds it at
    source: str = "<dict>"

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Load a space from a YAML path or a built-in name such as 'glit_micro'."""
        path = resolve_space_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SearchSpace:
        def fail(key: str, problem: str):
            raise UserError(f"{source}: {key}: {problem}")

        if not isinstance(data, dict):
            fail("(top level)", "expected a mapping of keys such as embed_dim, depth, num_heads")
        for key in data:
            if key not in _TOP_KEYS:
                fail(key, f"unknown key; allowed keys are {', '.join(_TOP_KEYS)}")
        for key in _TOP_KEYS:
            if key not in data:
                fail(key, "missing; every space file needs it (see search_spaces/glit_tiny.yaml)")
        skeleton = {"name": str(data["name"])}
        for key in _SKELETON[1:]:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, f"must be a positive integer, got {value!r}")
            skeleton[key] = value
        C, H = skeleton["embed_dim"], skeleton["num_heads"]
        if C % H:
            fail("num_heads", f"{H} heads do not divide embed_dim {C}; pick a divisor of {C}")
        if skeleton["img_size"] % skeleton["patch_size"]:
            fail("patch_size", f"{skeleton['patch_size']} does not divide img_size {skeleton['img_size']}")

        heads = data["global_heads"]
        if not isinstance(heads, list) or not heads:
            fail("global_heads", "must be a non-empty list of global-head counts G")
        for g in heads:
            if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= H:
                fail("global_heads", f"G = {g!r} is outside 0..{H} (num_heads); use values in 0..{H}")
        if len(set(heads)) != len(heads):
            fail("global_heads", "lists a G twice; list each value once")
        used_kinds = sorted({_kind(g, H) for g in heads}, key=list(KIND_FIELDS).index)

        blocks, defaults = data["blocks"], data["defaults"]
        for key, section in (("blocks", blocks), ("defaults", defaults)):
            if not isinstance(section, dict):
                fail(key, "must map block kinds (local, mixed, global) to their fields")
            for kind in section:
                if kind not in KIND_FIELDS:
                    fail(f"{key}.{kind}", "unknown block kind; use local (G=0), mixed (0<G<H) or global (G=H)")

        choices: dict[str, dict[str, tuple]] = {}
        kind_defaults: dict[str, dict[str, Any]] = {}
        for kind in used_kinds:
            spec = blocks.get(kind)
            if not isinstance(spec, dict):
                fail(f"blocks.{kind}", f"missing; global_heads uses {kind} blocks, so list their choices")
            for field in spec:
                if field not in KIND_FIELDS[kind]:
                    fail(f"blocks.{kind}.{field}", f"unknown field; {kind} blocks take {', '.join(KIND_FIELDS[kind])}")
            choices[kind] = {}
            for field in KIND_FIELDS[kind]:
                key = f"blocks.{kind}.{field}"
                if field not in spec:
                    fail(key, "missing; give a list of choices or a single fixed value")
                values = spec[field] if isinstance(spec[field], list) else [spec[field]]
                if not values:
                    fail(key, "empty choice list; give at least one value")
                for value in values:
                    problem = _size_problem(field, value, kind, C, H, heads)
                    if problem:
                        fail(key, problem)
                if len(set(values)) != len(values):
                    fail(key, "lists a value twice; list each choice once")
                choices[kind][field] = tuple(values)

            given = defaults.get(kind) or {}
            if not isinstance(given, dict):
                fail(f"defaults.{kind}", "must map fields to the value the high-level search holds them at")
            kind_defaults[kind] = {}
            for field, values in choices[kind].items():
                key = f"defaults.{kind}.{field}"
                if len(values) == 1:
                    kind_defaults[kind][field] = values[0]
                elif field not in given:
                    fail(key, f"missing; the high level needs a default among {list(values)}")
                elif given[field] not in values:
                    fail(key, f"{given[field]!r} is not one of the choices {list(values)}")
                else:
                    kind_defaults[kind][field] = given[field]
            for field in given:
                if field not in choices[kind]:
                    fail(f"defaults.{kind}.{field}", f"unknown field; {kind} blocks take {', '.join(KIND_FIELDS[kind])}")

        return cls(**skeleton, global_heads=tuple(heads), choices=choices, defaults=kind_defaults, source=source)

    def to_dict(self) -> dict:
        """The YAML mapping this space was loaded from (fixed sizes collapsed to scalars)."""
        return {
            **{key: getattr(self, key) for key in _SKELETON},
            "global_heads": list(self.global_heads),
            "blocks": {k: {f: v[0] if len(v) == 1 else list(v) for f, v in fs.items()} for k, fs in self.choices.items()},
            "defaults": {k: {f: v for f, v in fs.items() if len(self.choices[k][f]) > 1} for k, fs in self.defaults.items()},
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()

    # ---- structure -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def widths(self, block: Block) -> dict[str, int]:
        """Channel widths of a block's parts; the model and the cost formulas both read them here."""
        global_dim = self.embed_dim * block.g // self.num_heads
        local_dim = self.embed_dim - global_dim
        return {
            "global": global_dim,
            "local": local_dim,
            "attn_head": int(block.attn_expansion * self.head_dim) if global_dim else 0,
            "conv_hidden": int(block.conv_expansion * local_dim) if local_dim else 0,
            "mlp_hidden": int(block.mlp_ratio * self.embed_dim),
        }

    def kind(self, g: int) -> str:
        return _kind(g, self.num_heads)

    def options(self, g: int) -> tuple[Block, ...]:
        """Every low-level option of a block with G global heads (the product of its choices)."""
        fields = self.choices[self.kind(g)]
        return tuple(Block(g, **dict(zip(fields, combo))) for combo in itertools.product(*fields.values()))

    def default_block(self, g: int) -> Block:
        return Block(g, **self.defaults[self.kind(g)])

    def block_choices(self, level: str, distribution: tuple[int, ...] | None = None) -> list[tuple[Block, ...]]:
        """The Blocks allowed at each depth position at `level` (low level: for `distribution`)."""
        if check_level(level) == "high":
            return [tuple(self.default_block(g) for g in self.global_heads)] * self.depth
        if distribution is None:
            raise UserError("the low level needs a G distribution: pass --distribution ARCH_STRING or a high-level RUN_DIR")
        self.validate_distribution(distribution)
        return [self.options(g) for g in distribution]

    def size(self, level: str, distribution: tuple[int, ...] | None = None) -> int:
        """How many architectures the level holds."""
        count = 1
        for allowed in self.block_choices(level, distribution):
            count *= len(allowed)
        return count

    # ---- validation ------------------------------------------------------------------------
    def validate_distribution(self, distribution: tuple[int, ...]) -> tuple[int, ...]:
        if len(distribution) != self.depth:
            raise UserError(f"distribution has {len(distribution)} blocks but space {self.name} has depth {self.depth}")
        for i, g in enumerate(distribution):
            if g not in self.global_heads:
                raise UserError(f"block {i}: G = {g} is not in space {self.name}'s global_heads {list(self.global_heads)}")
        return tuple(distribution)

    def validate(self, arch: Architecture, level: str | None = None) -> Architecture:
        """Check `arch` fits this space (and, with `level`, that level's genes); return it."""
        self.validate_distribution(arch.distribution)
        for i, block in enumerate(arch.blocks):
            allowed = self.options(block.g) if level in (None, "low") else (self.default_block(block.g),)
            if block in allowed:
                continue
            fields = self.choices[self.kind(block.g)]
            sizes = block.sizes()
            for field in sorted(set(fields) | set(sizes)):
                if field not in fields:
                    raise UserError(f"block {i}: field {field} is not used by {self.kind(block.g)} blocks; drop it")
                if field not in sizes:
                    raise UserError(f"block {i}: field {field} is missing; {self.kind(block.g)} blocks need it")
                if sizes[field] not in fields[field]:
                    raise UserError(f"block {i}: {field} = {sizes[field]:g} is not one of {list(fields[field])}")
            raise UserError(f"block {i}: {block} is not the high-level default {self.default_block(block.g)}")
        return arch

    # ---- search operators ------------------------------------------------------------------
    def sample(self, level: str, rng: random.Random, distribution: tuple[int, ...] | None = None) -> Architecture:
        """A uniformly random architecture of `level`."""
        return Architecture(tuple(rng.choice(allowed) for allowed in self.block_choices(level, distribution)))

    def mutate(self, arch: Architecture, level: str, prob: float, rng: random.Random,
               changed: bool = False) -> Architecture:
        """Resample each gene with probability `prob` (the low level keeps `arch`'s distribution); with `changed`,
        first set one gene drawn at random to another of its values, so that the child differs from `arch`."""
        allowed = self.block_choices(level, arch.distribution if level == "low" else None)
        blocks = [rng.choice(a) if rng.random() < prob else b for a, b in zip(allowed, arch.blocks)]
        movable = [i for i, a in enumerate(allowed) if len(a) > 1]
        if changed and movable and tuple(blocks) == arch.blocks:
            i = rng.choice(movable)
            blocks[i] = rng.choice([b for b in allowed[i] if b != arch.blocks[i]])
        return Architecture(tuple(blocks))

    @staticmethod
    def crossover(a: Architecture, b: Architecture, rng: random.Random) -> Architecture:
        """Uniform crossover: each block from either parent with equal probability."""
        return Architecture(tuple(x if rng.random() < 0.5 else y for x, y in zip(a.blocks, b.blocks)))


def _kind(g: int, num_heads: int) -> str:
    return "local" if g == 0 else "global" if g == num_heads else "mixed"


def _size_problem(field: str, value: Any, kind: str, C: int, H: int, heads: list[int]) -> str | None:
    """Why `value` cannot be a `field` choice in this skeleton, or None when it can."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return f"{value!r} must be a positive number"
    if field == "kernel" and (not isinstance(value, int) or value % 2 == 0):
        return f"kernel {value!r} must be an odd integer ('same' padding needs an odd kernel)"
    if field == "attn_expansion" and (value * C / H) % 1:
        return f"attention expansion {value:g} times head width {C // H} is not a whole number of channels"
    if field == "conv_expansion":
        local_widths = {C * (H - g) // H for g in heads if _kind(g, H) == kind}
        if any((value * w) % 1 for w in local_widths):
            return f"conv expansion {value:g} does not give a whole number of channels for local widths {sorted(local_widths)}"
    if field == "mlp_ratio" and (value * C) % 1:
        return f"MLP ratio {value:g} times embed_dim {C} is not a whole number of channels"
    return None


def resolve_space_path(path: str | Path) -> Path:
    """A YAML path as given, or a built-in space by name ('glit_micro', 'glit_tiny', ...)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    builtin = resources.files("glit_ray.search_spaces") / f"{candidate.stem}.yaml"
    if len(candidate.parts) == 1 and candidate.suffix in ("", ".yaml") and builtin.is_file():
        return Path(str(builtin))
    names = ", ".join(builtin_spaces())
    raise UserError(f"search space {str(path)!r} not found: give a YAML path or a built-in name ({names})")


def builtin_spaces() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("glit_ray.search_spaces").iterdir() if p.name.endswith(".yaml"))
