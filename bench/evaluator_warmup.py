"""P7: evaluator warm-up and memory per 1,000 held-out images: the first actor, a second on the node, a restarted one.

The search decodes its scoring sets once (`glit_ray.training.imagesets.scoring_sets`: Ray tasks decode the
calibration sample and the held-out images into uint8 chunks kept in the object store), then
starts its evaluator actors (`glit_ray.searching.evaluator.Evaluator`, with `evaluator_pool`'s options),
which load the supernet and map the sets from their node's object store. Timed, wall clock in
the driver:

- *first actor*: decoding the sets, then the first actor from its creation until it answers `stats`;
- *second actor*: another actor created on the node while the first lives, until it answers `stats`;
- *restarted actor*: an actor's process SIGKILLed with a `score` call in flight, from that call (the
  process's death) until the restarted process answers `stats` (`restarted` True, a new pid).

For scale, the floor any actor pays: a Ray actor that only imports `glit_ray.searching.evaluator` (a new
worker process importing torch, timm and the package), timed the same way.

Memory: the object store's bytes in use (the raylet's count) after decoding and after every actor
and restart, and each actor process's RSS / USS / PSS and RSS's anonymous (allocated by the
process) and shared-memory (mapped from the object store) parts at the start of its `__init__`,
when ready (sets mapped), after reading every page of the images, and after scoring one
candidate. The held-out images are counted once per node when the store's bytes do not grow with
actors and reading the images grows an actor's shared-memory RSS, not its own (anonymous)
memory. (USS is no measure of that: it counts a shared page as the process's own while no other
live process maps it.) The old way,
each actor decoding the held-out split itself into float32, is a computed figure (4 bytes a
pixel, private to each actor, decoded again on each restart).

The bench runs two rounds, at a small and a large held-out split, each with its own decoded sets,
actors and restarts. The difference between the rounds, per 1,000 held-out images, is what an
actor's warm-up costs for the held-out images: the first actor's grows with them (it decodes
them), a later actor's should not (it maps them). The whole warm-up at the large size is reported
too: it holds the fixed costs no handling of the images can remove (Ray's new worker process,
importing torch; Ray noticing a dead actor).

Target: per 1,000 held-out images, second and restarted actor <= 0.10 of the first actor's time.

    python bench/evaluator_warmup.py [--data imagefolder:PATH] [--classes 20] [--train-per-class 2500]
                                     [--calib-batches 16] [--heldout-images 2000,10000] [--restarts 5] [--record]

The defaults are what a search scores with on an image folder (`SCORING_DEFAULTS`: 16 calibration
batches of 64, 10,000 held-out images), and 2,000 held-out images for the small round. Without --data it writes a synthetic 256-px JPEG folder
(`glit_ray.synthetic`'s images, two processes) whose held-out split (20 % of train) has
classes x train-per-class / 5 images: 10,000 by default, about 5 minutes of writing here.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import ray
import psutil  # Ray's vendored copy (ray/thirdparty_files, on the path once ray is imported)
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address

from glit_ray.cluster.resources import ClusterShape, NodeType, evaluators
from glit_ray.models.space import SearchSpace
from glit_ray.models.supernet import GLiTSupernet, save_supernet
from glit_ray.searching.evaluator import Evaluator
from glit_ray.synthetic import synthetic_image
from glit_ray.training.data import build_splits
from glit_ray.training.imagesets import SCORING_DEFAULTS, scoring_sets

from harness import publish, spread

MiB = 2**20
# what the search asks for 2 CPU evaluators on this bench's 2-CPU Ray (`evaluators`, as `evaluator_pool` places them)
ACTOR_CPUS = evaluators(2, 0, shape=ClusterShape((NodeType("head", 2, 0, 1),), "the bench's Ray")).cpus


def memory(pid: int | None = None) -> dict:
    """RSS, USS and PSS of a process, and RSS's anonymous (heap: what the process allocated itself) and
    shared-memory (the object store's pages it maps) parts."""
    process = psutil.Process(pid)
    info = process.memory_full_info()
    with open(f"/proc/{process.pid}/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("RssAnon", "RssShmem"))}
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss, "anon": status["RssAnon"], "shmem": status["RssShmem"]}


class MeasuredEvaluator(Evaluator):
    """The search's evaluator, its `__init__` untouched, with its process's memory taken around it."""

    def __init__(self, *args, **kwargs):
        self.memory_at = {"start of __init__": memory()}
        super().__init__(*args, **kwargs)
        self.memory_at["ready"] = memory()

    def read_images(self) -> int:
        """Read one byte of every page of every image (what scoring reads), allocating nothing."""
        total = 0
        for image_set in self.sets.values():
            for images, _ in image_set.chunks:
                total += int(images.reshape(-1)[::1024].sum())
        self.memory_at["every image read"] = memory()
        return total

    def scored(self) -> dict:
        """The memory taken so far, and now (called after `score`)."""
        self.memory_at["after scoring one candidate"] = memory()
        return self.memory_at


@ray.remote(num_cpus=0.1)
class ImportsOnly:
    """The floor: a new worker process that imports what an evaluator imports, and loads nothing."""

    def __init__(self):
        import glit_ray.searching.evaluator  # noqa: F401  (torch, timm, the package)

    def ping(self) -> int:
        return os.getpid()


def write_class(root: Path, label: int, classes: int, train: int, size: int = 256) -> None:
    rng = np.random.default_rng([0, label])
    for split, count in (("train", train), ("val", 1)):
        folder = root / split / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            synthetic_image(label, classes, size, rng).save(folder / f"{i:05d}.jpg", quality=90)


def write_folder(root: Path, classes: int, train: int) -> None:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(write_class, [root] * classes, range(classes), [classes] * classes, [train] * classes))


def store_bytes() -> int:
    """Bytes in use in the object store (all nodes; here one), as the raylet counts them."""
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


def until_ready(actor, method: str = "stats") -> tuple[float, object]:
    """Seconds until `actor` answers `method` (retried while Ray restarts it), and the answer."""
    started = time.perf_counter()
    while True:
        try:
            answer = ray.get(getattr(actor, method).remote())
            return time.perf_counter() - started, answer
        except ray.exceptions.RayActorError:
            time.sleep(0.01)


def process_note(pid: int, since: float) -> str:
    """When the actor's process started, against `since` (when it was asked for): before it, Ray had it running."""
    age = since - psutil.Process(pid).create_time()
    return f"its worker process started {age:.0f} s before" if age > 1 else "a worker process started for it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="imagefolder:PATH to use (default: write a synthetic folder)")
    parser.add_argument("--classes", type=int, default=20, help="of the synthetic folder")
    parser.add_argument("--train-per-class", type=int, default=2500, help="of the synthetic folder (held-out: 20 %%)")
    parser.add_argument("--space", default="glit_pico")
    calib_batches, heldout_images = SCORING_DEFAULTS["imagefolder"]
    parser.add_argument("--calib-batches", type=int, default=calib_batches,
                        help="calibration batches of 64 (default: the search's on an image folder)")
    parser.add_argument("--heldout-images", type=sizes, default=[2000, heldout_images],
                        help="SMALL,LARGE held-out split sizes, measured one after the other (default: 2000 and the "
                             "search's on an image folder); their difference gives the seconds per 1,000 held-out images")
    parser.add_argument("--restarts", type=int, default=5, help="actor restarts timed, alternating between the two actors")
    parser.add_argument("--record", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    if args.restarts < 1:
        parser.error("--restarts must be at least 1")
    space = SearchSpace.load(args.space)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            started = time.perf_counter()
            write_folder(Path(tmp) / "images", args.classes, args.train_per_class)
            data = f"imagefolder:{Path(tmp) / 'images'}"
            print(f"wrote {args.classes} x {args.train_per_class} training JPEGs in {time.perf_counter() - started:.0f} s",
                  flush=True)
        splits = build_splits(data, space.img_size, space.in_chans)
        torch.manual_seed(0)
        save_supernet(GLiTSupernet(space, "high", None, splits.num_classes), Path(tmp) / "supernet.pt")
        supernet_bytes = (Path(tmp) / "supernet.pt").read_bytes()
        # address="local": a cluster of its own, even where another one runs on the machine
        ray.init(address="local", num_cpus=2, log_to_driver=False, configure_logging=False)
        try:
            rounds = [measure(args, splits, supernet_bytes, space, n) for n in args.heldout_images]
            body = report(args, data, rounds)
        finally:
            ray.shutdown()
    publish("P7", body, args.record)


def sizes(text: str) -> list[int]:
    """'SMALL,LARGE' held-out sizes, SMALL < LARGE."""
    try:
        small, large = (int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two sizes SMALL,LARGE, e.g. 2000,10000") from None
    if not 0 < small < large:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < SMALL < LARGE")
    return [small, large]


def measure(args, splits, supernet_bytes: bytes, space: SearchSpace, heldout_images: int) -> dict:
    """One round at `heldout_images`: decode the sets, start two actors, score, restart; the sets are freed after."""
    m = {"supernet": len(supernet_bytes), "store": {}, "memory": {}, "restarts": [], "load": [os.getloadavg()[0]]}
    print(f"-- {heldout_images} held-out images", flush=True)
    empty_store = store_bytes()
    ref = ray.put(supernet_bytes)  # as evaluator_pool: the driver holds the supernet's bytes and the sets while actors live
    started = time.perf_counter()
    sets = scoring_sets(splits, args.calib_batches, heldout_images)
    m["decode"] = time.perf_counter() - started
    m["sizes"] = {name: (len(image_set), image_set.nbytes) for name, image_set in sets.items()}
    m["store"]["sets decoded (the driver holds them and the supernet's bytes)"] = store_bytes() - empty_store
    print(f"decoded {m['sizes']['calibration'][0]} calibration + {m['sizes']['heldout'][0]} held-out images in "
          f"{m['decode']:.2f} s", flush=True)

    remote = ray.remote(MeasuredEvaluator).options(num_cpus=ACTOR_CPUS, num_gpus=0, max_restarts=-1, max_task_retries=0)
    actors = []
    for i, name in enumerate(["first", "second"]):
        created = time.time()
        actors.append(remote.remote(ref, sets, i, 1, None))
        seconds, stats = until_ready(actors[-1])
        m[name] = {"seconds": seconds, "init": stats["ready_seconds"], "process": process_note(stats["pid"], created)}
        m["store"][f"{name} actor ready"] = store_bytes() - empty_store
        print(f"{name} actor ready in {seconds:.2f} s (its __init__ {stats['ready_seconds']:.2f} s, pid {stats['pid']}, "
              f"{m[name]['process']})", flush=True)
    m["stats_call"] = statistics.median(timed(lambda: ray.get(actors[0].stats.remote())) for _ in range(5))

    created = time.time()
    floor = ImportsOnly.remote()
    seconds, pid = until_ready(floor, "ping")
    m["floor"] = {"seconds": seconds, "process": process_note(pid, created)}
    ray.kill(floor)
    print(f"an actor that only imports glit_ray.searching.evaluator answers in {seconds:.2f} s ({m['floor']['process']})", flush=True)

    arch = str(space.sample("high", random.Random(0)))
    ray.get([a.read_images.remote() for a in actors])
    started = time.perf_counter()
    ray.get([a.score.remote(arch) for a in actors])  # both actors side by side
    m["score"] = time.perf_counter() - started
    for name, actor in zip(["first", "second"], actors):
        m["memory"][name] = ray.get(actor.scored.remote())
    m["store"]["both actors read every image and scored a candidate"] = store_bytes() - empty_store
    print(f"one candidate scored on both actors in {m['score']:.1f} s", flush=True)

    for r in range(args.restarts):
        actor = actors[r % 2]
        before = ray.get(actor.stats.remote())
        started = time.perf_counter()
        call = actor.score.remote(arch)
        os.kill(before["pid"], signal.SIGKILL)  # the process dies with the call in flight, as on a crash or a lost node
        try:
            ray.get(call)
            raise SystemExit("error: the actor scored instead of dying")
        except ray.exceptions.RayActorError:
            failed = time.perf_counter() - started
        seconds, stats = until_ready(actor)
        if not stats["restarted"] or stats["pid"] == before["pid"] or stats["loads"] != 1:
            raise SystemExit(f"error: actor {r % 2} did not come back as a new process: {stats}")
        m["restarts"].append({"seconds": failed + seconds, "init": stats["ready_seconds"], "failed": failed,
                              "process": process_note(stats["pid"], time.time() - seconds - failed)})
        m["store"][f"restart {r + 1} ready"] = store_bytes() - empty_store
        print(f"restart {r + 1} (actor {r % 2}, pid {before['pid']} -> {stats['pid']}): ready {failed + seconds:.2f} s "
              f"after the killing call ({failed:.2f} s until it failed); its __init__ {stats['ready_seconds']:.2f} s, "
              f"{m['restarts'][-1]['process']}", flush=True)
    restarted = actors[(args.restarts - 1) % 2]
    ray.get(restarted.read_images.remote())
    ray.get(restarted.score.remote(arch))
    m["memory"]["last restarted"] = ray.get(restarted.scored.remote())
    m["store"]["the last restarted actor read every image and scored a candidate"] = store_bytes() - empty_store
    for actor in actors:
        ray.kill(actor, no_restart=True)
    del sets, ref
    deadline = time.monotonic() + 60
    while store_bytes() > empty_store and time.monotonic() < deadline:  # the next round starts from an empty store
        time.sleep(0.2)
    m["load"].append(os.getloadavg()[0])
    return m


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def span(values: list[int], spec: str) -> str:
    """'LOW to HIGH' MiB of byte counts, or one figure where they round alike."""
    low, high = (format(v / MiB, spec) for v in (min(values), max(values)))
    return low if low == high else f"{low} to {high}"


def warmups(m: dict) -> dict:
    """A round's three warm-up times: first actor (decoding included), second actor, restarted actor (median)."""
    return {"first": m["decode"] + m["first"]["seconds"], "second": m["second"]["seconds"],
            "restarted": statistics.median(r["seconds"] for r in m["restarts"])}


def report(args, data: str, rounds: list[dict]) -> str:
    small, m = rounds
    n_small, n_large = (r["sizes"]["heldout"][0] for r in rounds)
    (calib, calib_bytes), (heldout, heldout_bytes) = m["sizes"]["calibration"], m["sizes"]["heldout"]
    per = 1000 / heldout
    whole = warmups(m)
    first = whole["first"]
    restarts = [r["seconds"] for r in m["restarts"]]
    restart_init = statistics.median(r["init"] for r in m["restarts"])
    before = warmups(small)
    slope = {k: (whole[k] - before[k]) * 1000 / (n_large - n_small) for k in whole}

    def row(label, seconds, init, note):
        init = f"{init:.2f}" if init is not None else ""
        return f"| {label} | {seconds:.2f} | {init} | {seconds / first:.3f} | {note} |"

    times = [
        row("first actor: decode the sets, then start", first, m["first"]["init"],
            f"decode {m['decode']:.2f} s ({calib} calibration + {heldout} held-out images, Ray tasks on 2 CPUs), then "
            f"the actor {m['first']['seconds']:.2f} s ({m['first']['process']})"),
        row("second actor on the node", whole["second"], m["second"]["init"],
            f"created while the first lives ({m['second']['process']})"),
        row(f"restarted actor (median of {len(restarts)})", whole["restarted"], restart_init,
            f"from the call that killed its process (min / median / max {spread(restarts)} s, of which the call took "
            f"{statistics.median(r['failed'] for r in m['restarts']):.2f} s to fail; "
            f"{', '.join(sorted(set(r['process'] for r in m['restarts'])))})"),
        row("for scale: an actor that only imports `glit_ray.searching.evaluator`", m["floor"]["seconds"], None,
            f"the floor of any actor ({m['floor']['process']})"),
    ]
    per_thousand = [f"| {label} | {before[k]:.2f} | {whole[k]:.2f} | {slope[k]:.3f} | {slope[k] / slope['first']:.3f} |"
                    for k, label in [("first", "first actor (decoding included)"), ("second", "second actor on the node"),
                                     ("restarted", "restarted actor (median)")]]
    memory_rows = []
    for actor, moments in m["memory"].items():
        start = moments["start of __init__"]
        for moment, mem in moments.items():
            memory_rows.append(f"| {actor} | {moment} | {mem['rss'] / MiB:.0f} | {mem['uss'] / MiB:.0f} | "
                               f"{mem['pss'] / MiB:.0f} | {mem['anon'] / MiB:.0f} | {mem['shmem'] / MiB:.0f} | "
                               f"{(mem['anon'] - start['anon']) / MiB:+.0f} |")
    read = [mom["every image read"]["anon"] - mom["ready"]["anon"] for mom in m["memory"].values()]
    shm = [mom["every image read"]["shmem"] - mom["ready"]["shmem"] for mom in m["memory"].values()]
    sets_mib = (calib_bytes + heldout_bytes) / MiB
    heldout_mib = heldout_bytes / MiB
    loads = [f"{r['load'][0]:.1f}" for r in rounds] + [f"{m['load'][1]:.1f}"]
    return "\n".join([
        f"{args.space} (untrained supernet) on {data.split(':')[0]}, {calib} calibration images; one Ray node of 2 CPUs, "
        f"actors of {ACTOR_CPUS} CPU and 1 torch thread, as `evaluator_pool` makes them. Two rounds one after the other, "
        f"with {n_small} and {n_large} held-out images, each with its own sets, actors and restarts. Wall seconds in the "
        f"driver until the actor answers `stats` (a warm `stats` call takes {m['stats_call'] * 1e3:.0f} ms). The "
        f"machine's 1-minute load average was {' / '.join(loads)} at the start of each round and at the end.", "",
        f"**Per 1,000 held-out images** (the difference between the rounds, over {(n_large - n_small) / 1000:g} thousand "
        "images): what an actor's warm-up costs for each 1,000 more held-out images.", "",
        f"| actor | seconds at {n_small} | seconds at {n_large} | seconds per 1,000 held-out | / first's |",
        "| --- | ---: | ---: | ---: | ---: |", *per_thousand, "",
        f"**Per 1,000 held-out images: second / first {slope['second'] / slope['first']:.3f}, restarted / first "
        f"{slope['restarted'] / slope['first']:.3f}** (target <= 0.10).", "",
        f"**Whole warm-up at {heldout} held-out images** ({heldout_mib:.1f} MiB uint8 at 224 px, {sets_mib:.1f} MiB with the "
        "calibration images); *__init__ s* is the actor's own `ready_seconds` (supernet loaded, sets mapped):", "",
        "| actor | seconds | __init__ s | / first | |",
        "| --- | ---: | ---: | ---: | --- |", *times, "",
        f"Whole warm-up: second / first {whole['second'] / first:.3f}, restarted / first {whole['restarted'] / first:.3f}; "
        f"__init__ alone: second {m['second']['init'] / first:.3f}, restarted {restart_init / first:.3f} of the first's time.", "",
        "Object store bytes in use over the empty store's, MiB (the raylet's count; the supernet's "
        f"{m['supernet'] / MiB:.1f} MiB are in it too):", "",
        "| when | MiB |", "| --- | ---: |", *[f"| {what} | {value / MiB:.1f} |" for what, value in m["store"].items()], "",
        "Each actor process's memory, MiB: RSS, USS, PSS, and RSS's two parts that matter here, *anon* (memory the "
        "process allocated itself) and *shm* (the object store's pages it maps). USS counts a shared page as the "
        "process's own while no other live process maps it, so it can grow on reading the images when the actor is "
        f"their only reader. Scoring one candidate took {m['score']:.1f} s on both actors side by side; what it adds to "
        "*anon* is scoring's working memory (a float batch, activations), which any way of holding the images needs.", "",
        "| actor | when | RSS | USS | PSS | anon | shm | anon since start |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *memory_rows, "",
        f"Reading every image grew an actor's shared-memory RSS by {span(shm, '.0f')} MiB (the sets are {sets_mib:.1f} "
        f"MiB) and its own memory (anon) by {span(read, '.1f')} MiB, and the object store's bytes did not grow with actors or restarts: the images are the node's one copy. "
        f"The old way, each actor decoding the held-out split itself into float32, held "
        f"{4 * heldout_mib:.1f} MiB privately per actor ({4 * heldout_mib * per:.0f} MiB per 1,000 held-out images per "
        f"actor), {8 * heldout_mib:.1f} MiB for these two, and decoded again on every restart; now "
        f"{heldout_mib:.1f} MiB ({heldout_mib * per:.0f} MiB per 1,000) sit once in the node's object store.",
    ])


if __name__ == "__main__":
    main()
