"""A run directory mirrored to cloud storage (S3, GCS, any pyarrow filesystem URI).

A search writes its run directory on the head node's disk; with `--mirror s3://bucket/prefix` it
also pushes what changed there after every generation, so that when the head node is lost a new
one pulls the run back (`--resume --mirror ...`) and continues. pyarrow's filesystems do the
transfers: one object per file, and an object store shows an object whole or not at all.

Order matters for a consistent copy: Tune's experiment state (RUN_DIR/tune, the searcher's
snapshot) is pushed after the results it describes. A push cut short therefore leaves the mirror
with results at most one generation ahead of the snapshot, and resuming from it re-runs that
generation and rewrites its file with the same rows; the other way round it would lose one.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
from ray import tune

from glit_ray.core.errors import UserError

LAST = ("tune",)  # pushed after everything else: the searcher's snapshot must not run ahead of the results


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise UserError(f"--mirror {uri}: not a storage URI pyarrow can open ({str(exc).splitlines()[0]}); "
                        "give s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path") from None


def push_order(names) -> list[str]:
    """Files in the order a push uploads them: results first, Tune's experiment state last."""
    return sorted(names, key=lambda name: (name.split("/", 1)[0] in LAST, name))


class Mirror:
    """Keeps a copy of one run directory at `uri`, pushing only files that changed since the last push."""

    def __init__(self, run_dir: Path, uri: str):
        self.run_dir, self.uri = Path(run_dir), uri
        self.fs, self.root = open_uri(uri)
        self.pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) at its last push

    def local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for path in self.run_dir.rglob("*"):
            if path.is_file() and not path.name.startswith("."):  # .tmp files of writes in progress
                stat = path.stat()
                files[path.relative_to(self.run_dir).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return files

    def push(self) -> int:
        """Upload new and changed files (Tune's state last) and delete the mirror's files gone locally; returns uploads."""
        files = self.local_files()
        changed = push_order(name for name, stamp in files.items() if self.pushed.get(name) != stamp)
        for name in changed:
            target = f"{self.root}/{name}"
            folder, base = target.rsplit("/", 1)
            self.fs.create_dir(folder, recursive=True)
            partial = f"{folder}/.{base}.partial"  # moved into place whole: a push cut short leaves no torn file
            with open(self.run_dir / name, "rb") as source, self.fs.open_output_stream(partial) as out:
                out.write(source.read())
            self.fs.move(partial, target)
            self.pushed[name] = files[name]
        for name in sorted(set(self.pushed) - set(files)):  # e.g. checkpoints Ray Train rotated out
            self.fs.delete_file(f"{self.root}/{name}")
            del self.pushed[name]
        return len(changed)

    def pull(self) -> int:
        """Download the mirror into the (empty or missing) run directory; returns the number of files."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise UserError(f"{self.run_dir} is not empty: pull {self.uri} into a new --out, or resume from the local copy "
                            "without --mirror")
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=True))
        files = [info for info in infos if info.type == pafs.FileType.File and not info.base_name.startswith(".")]
        if not files:
            raise UserError(f"--mirror {self.uri} holds no run; check the URI (it is the one the search was started with)")
        for info in files:
            name = info.path[len(self.root.rstrip("/")) + 1:]
            target = self.run_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as source:
                target.write_bytes(source.read())
        self.pushed = self.local_files()
        return len(files)


class MirrorCallback(tune.Callback):
    """Pushes the run directory to its mirror after each generation's results are written."""

    def __init__(self, mirror: Mirror):
        self.mirror = mirror

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.mirror.push()
