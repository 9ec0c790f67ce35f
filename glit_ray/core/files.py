"""Atomic file writes and JSON reads, shared by every layer that writes a run's files (the supernet's checkpoint,
the results, the export, run.json, Tune's snapshot copies): a runtime module, below the model, so that none of them
climbs to `runs`."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from glit_ray.core.errors import UserError


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place: whoever reads `path`, even after
    this process is killed, finds the old content or the whole new one. `durable`: flushed to the disk before the
    rename, so that a power loss keeps it too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({type(exc).__name__}); it is not a glit_ray run file") from None
