"""Architectures: one `Block` gene per transformer block, with a compact string and a JSON form.

A block is fully described by its number of global heads `g` and the sizes its parts use:
`kernel` and `conv_expansion` for the local (convolution) heads, `attn_expansion` for the global
(attention) heads, `mlp_ratio` for the MLP. Sizes a block kind does not use are None: a block
with g == num_heads has no kernel, one with g == 0 has no attention expansion.

String form, one token per block joined by '-': `G:` then the sizes it uses, lettered
k (kernel), c (conv expansion), v (attention expansion), m (MLP ratio), e.g. the first blocks of
the published GLiT-Tiny: `3:v0.5m4-0:k31c2m4-1:k31c4v1m6`. Both forms round-trip exactly and
need no search space to parse; `SearchSpace.validate` checks one against a space.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

from glit_ray.core.errors import UserError

_LETTERS = {"kernel": "k", "conv_expansion": "c", "attn_expansion": "v", "mlp_ratio": "m"}
_FIELDS = {letter: name for name, letter in _LETTERS.items()}
_TOKEN = re.compile(r"^(\d+):((?:[kcvm]\d+(?:\.\d+)?)*)$")
_SIZE = re.compile(r"([kcvm])(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Block:
    """One transformer block: `g` global heads (the rest local) and the sizes it uses."""

    g: int
    kernel: int | None = None
    conv_expansion: float | None = None
    attn_expansion: float | None = None
    mlp_ratio: float | None = None

    def __post_init__(self):
        # Normalise numbers so that equal blocks hash equally whatever types they were built from.
        object.__setattr__(self, "g", int(self.g))
        if self.kernel is not None:
            object.__setattr__(self, "kernel", int(self.kernel))
        for name in ("conv_expansion", "attn_expansion", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    def sizes(self) -> dict[str, float]:
        """The sizes this block uses, by field name (None fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)[1:] if getattr(self, f.name) is not None}

    def __str__(self) -> str:
        return f"{self.g}:" + "".join(f"{_LETTERS[k]}{v:g}" for k, v in self.sizes().items())

    @classmethod
    def parse(cls, token: str) -> Block:
        match = _TOKEN.match(token.strip())
        if not match:
            raise UserError(
                f"architecture block {token!r} is malformed: write G:sizes, e.g. '1:k31c4v1m6' "
                "(k kernel, c conv expansion, v attention expansion, m MLP ratio)"
            )
        sizes = {_FIELDS[letter]: float(value) for letter, value in _SIZE.findall(match.group(2))}
        return cls(g=int(match.group(1)), **sizes)


@dataclass(frozen=True)
class Architecture:
    """A whole network: one Block per depth position. Immutable and hashable."""

    blocks: tuple[Block, ...]

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def distribution(self) -> tuple[int, ...]:
        """The global-head count of each block: what the high-level search decides."""
        return tuple(b.g for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __str__(self) -> str:
        return "-".join(str(b) for b in self.blocks)

    @classmethod
    def parse(cls, text: str) -> Architecture:
        text = text.strip()
        if not text:
            raise UserError("architecture string is empty: give one G:sizes token per block joined by '-'")
        return cls(tuple(Block.parse(token) for token in text.split("-")))

    def to_json(self) -> str:
        return json.dumps({"blocks": [{k: v for k, v in asdict(b).items() if v is not None} for b in self.blocks]})

    @classmethod
    def from_json(cls, text: str | dict) -> Architecture:
        data = json.loads(text) if isinstance(text, str) else text
        try:
            return cls(tuple(Block(**block) for block in data["blocks"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"architecture JSON is malformed ({exc}): expected {{\"blocks\": [{{\"g\": ..., ...}}, ...]}}"
            ) from None
