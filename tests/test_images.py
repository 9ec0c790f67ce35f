"""The real image path: 224-px JPEGs in a class-sorted ImageFolder through augmentation, sampling, decoding,
training, search and retraining (what the 8x8 digits cannot show)."""
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from glit_ray.core.errors import UserError
from glit_ray.synthetic import write_imagefolder
from glit_ray.training.data import DeviceAugment, build_splits, labels_of, normalize, posterize, train_transform
from glit_ray.training.imagesets import calibration_indices, heldout_indices, scoring_sets
from glit_ray.training.loaders import seed_all, training_loader


def stripe_angle(image: Image.Image) -> float:
    """The angle (degrees, 0-180) of the strongest stripes in `image`: its spectrum's peak, away from the DC term."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean())))
    centre = np.array(spectrum.shape) // 2
    spectrum[centre[0] - 1:centre[0] + 2, centre[1] - 1:centre[1] + 2] = 0
    fy, fx = np.unravel_index(spectrum.argmax(), spectrum.shape) - centre
    return float(np.degrees(np.arctan2(fy, fx)) % 180)


def test_a_horizontal_flip_keeps_a_synthetic_image_in_its_class():
    """The DeiT recipe flips half the images: a class's stripes must be at angles the flip maps onto themselves
    (a grating per class angle, as before, was mapped to another class's angle)."""
    from glit_ray.synthetic import TEXTURES, synthetic_image

    rng = np.random.default_rng(0)
    for label in range(10):
        degrees = TEXTURES[label % len(TEXTURES)][0]
        allowed = {degrees % 180, -degrees % 180}
        for _ in range(3):
            image = synthetic_image(label, 10, 128, rng)
            for seen in (image, ImageOps.mirror(image)):
                angle = stripe_angle(seen)
                assert min(min(abs(angle - a), 180 - abs(angle - a)) for a in allowed) < 8, (label, angle)


@pytest.mark.parametrize("where, message", [
    ("/proc/forbidden", "cannot write /proc/forbidden (No such file or directory); give a folder you can write"),
    ("file", "is not an empty folder; give a new folder"),
])
def test_the_synthetic_folder_on_a_path_it_cannot_write_is_one_line(tmp_path, cli_error, where, message):
    from glit_ray.synthetic import main

    (tmp_path / "file").write_text("mine")
    path = where if where.startswith("/") else str(tmp_path / where)
    assert message in cli_error(main, [path, "--classes", "2", "--train-per-class", "1", "--val-per-class", "1"])
    assert (tmp_path / "file").read_text() == "mine"


def test_posterize_keeps_the_op_at_every_bit_count():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert not np.asarray(posterize(image, 0)).any()  # 0 bits kept: black, as TF's RandAugment
    for bits in range(1, 8):
        assert np.array_equal(np.asarray(posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert posterize(image, 8) is image


def test_deit_training_transform_never_fails_on_valid_images():
    """The DeiT recipe drawn thousands of times, as shipped and with every RandAugment op forced to the
    magnitudes that failed (10: posterize to 0 bits), at 224 px and on small and odd-sized images."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((256, 256), (7, 300), (33, 17))]
    shipped = train_transform(224)
    forced = train_transform(32)
    randaugment = next(t for t in forced.transforms if hasattr(t, "ops"))
    assert any(op.name.startswith("Posterize") for op in randaugment.ops)
    for op in randaugment.ops:
        op.prob, op.magnitude = 1.0, 10.0
    for i in range(300):
        assert shipped(images[i % 3]).shape == (3, 224, 224)
    for i in range(3000):
        out = forced(images[i % 3])
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def test_calibration_covers_the_classes_of_a_class_sorted_folder(folder224):
    splits = build_splits(f"imagefolder:{folder224}", 224, 3)
    labels = labels_of(splits.calibration)
    assert labels == sorted(labels)  # ImageFolder order is class order
    first = Counter(labels[:64])
    sample = calibration_indices(splits, 64)
    drawn = Counter(labels[i] for i in sample)
    assert len(first) <= 3 and len(drawn) == 10  # the first batch shows 2 classes, the random sample all 10
    assert len(Counter(labels[i] for i in sample[:16])) >= 5  # and so does each of its batches, in drawn order
    assert sample == calibration_indices(build_splits(f"imagefolder:{folder224}", 224, 3), 64)  # fixed: every run
    assert len(sample) == 64 and len(set(sample)) == 64


def test_heldout_subset_is_fixed_and_class_stratified(folder224):
    splits = build_splits(f"imagefolder:{folder224}", 224, 3)
    labels = labels_of(splits.heldout)
    shares = Counter(labels)
    subset = heldout_indices(splits, 30)
    counts = Counter(labels[i] for i in subset)
    assert len(subset) == 30 and len(set(subset)) == 30
    assert all(abs(counts[c] - 30 * shares[c] / len(labels)) < 1 for c in shares)  # each class its share, +-1
    assert subset == heldout_indices(splits, 30)
    assert heldout_indices(splits, None) == list(range(len(labels)))


def test_scoring_sets_are_uint8_at_the_spaces_size_and_the_same_decoded_anywhere(ray_session, folder224):
    splits = build_splits(f"imagefolder:{folder224}", 224, 3)
    shared = {k: v.fetched() for k, v in scoring_sets(splits, 1, 24).items()}
    local = scoring_sets(splits, 1, 24, cluster=False, workers=2)
    for name in ("calibration", "heldout"):
        (x, y), = shared[name].chunks
        (x_local, y_local), = local[name].chunks
        assert x.dtype == torch.uint8 and x.shape == (64 if name == "calibration" else 24, 3, 224, 224)
        assert torch.equal(x, x_local) and torch.equal(y, y_local)
    batch, labels = next(shared["heldout"].batches(8, torch.device("cpu")))
    assert batch.dtype == torch.float32 and batch.shape == (8, 3, 224, 224) and -3 < batch.mean() < 3
    assert shared["heldout"].nbytes == 24 * 3 * 224 * 224 + 24 * 8


def test_in_memory_digits_go_to_the_store_as_they_are(ray_session, monkeypatch):
    """The digits are tensors already: their chunks are put in the object store from the driver (no decoding task),
    holding what a local decode holds."""
    import ray
    from glit_ray.training import imagesets

    monkeypatch.delattr(imagesets, "_decode_chunk")  # a decoding task would fail
    splits = build_splits("digits", 8, 1)
    shared, local = scoring_sets(splits, 10, None), scoring_sets(splits, 10, None, cluster=False)
    for name, count, chunks in (("calibration", 640, 2), ("heldout", len(splits.heldout), 1)):
        assert all(isinstance(chunk, ray.ObjectRef) for chunk in shared[name].chunks)  # a restart reloads from them
        fetched = shared[name].fetched()
        assert len(fetched.chunks) == len(local[name].chunks) == chunks and fetched.count == count
        for (x, y), (x_local, y_local) in zip(fetched.chunks, local[name].chunks):
            assert torch.equal(x, x_local) and torch.equal(y, y_local) and y.dtype == torch.int64
        assert shared[name].nbytes == local[name].nbytes


def test_augmentation_is_a_function_of_seed_epoch_and_index_whatever_the_loader_processes(folder224):
    """Loader processes persist across epochs; per-sample seeding makes every epoch's batches the same with
    0 or 2 of them, so a run resumed at any epoch replays the uninterrupted one. Loading in the training
    process leaves its random state alone: the draws of its drop-path and mixup are the same either way."""
    splits = build_splits(f"imagefolder:{folder224}", 64, 3)

    def epoch_batches(workers, epoch):
        loader = training_loader(splits, 16, seed=3, loader_workers=workers, device=torch.device("cpu"))
        loader.sampler.set_epoch(epoch)
        seed_all(7)
        batches = [batch for _, batch in zip(range(2), loader)]
        return batches, (torch.rand(3).tolist(), random.random(), np.random.rand())  # what the training step draws

    (inline, inline_draws), (parallel, parallel_draws) = epoch_batches(0, 1), epoch_batches(2, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, parallel))
    assert inline_draws == parallel_draws
    assert not torch.equal(epoch_batches(0, 2)[0][0][0], inline[0][0])  # another epoch, other augmentation


def test_training_batches_leave_the_loader_as_uint8_and_are_finished_on_the_device(folder224):
    """timm's prefetcher convention: a quarter of float32's bytes cross from the loader processes; normalisation and
    DeiT's random erasing run on the batch where it is, drawn from the training process's seeded state."""
    splits = build_splits(f"imagefolder:{folder224}", 224, 3)
    loader = training_loader(splits, 16, seed=3, loader_workers=2, device=torch.device("cpu"))
    loader.sampler.set_epoch(0)
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 224, 224)
    augment = DeviceAugment(splits, torch.device("cpu"))
    plain = normalize(images, splits.mean, splits.std)

    def finished(seed):
        seed_all(seed)
        return augment(images.clone())

    first = finished(5)
    assert first.dtype == torch.float32 and torch.equal(first, finished(5)) and not torch.equal(first, finished(6))
    erased = [not torch.equal(a, b) for a, b in zip(first, plain)]
    assert 0 < sum(erased) < 16  # DeiT's probability, 0.25, per image
    kept = [a for a, b, e in zip(first, plain, erased) if not e]
    assert all(torch.equal(a, b) for a, b in zip(kept, [b for b, e in zip(plain, erased) if not e]))
    assert -3 < plain.mean() < 3 and 0.3 < plain.std() < 3  # normalised as the network takes it


def test_an_unreadable_image_is_named_in_one_line(ray_session, tmp_path, capsys):
    from glit_ray.core.cli import run
    from glit_ray.train_supernet import main

    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=6, val_per_class=2, size=64)
    bad = root / "train" / "class_001" / "00003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-file
    splits = build_splits(f"imagefolder:{root}", 32, 3)
    position = splits.calibration.dataset.samples.index((str(bad), 1))
    with pytest.raises(UserError, match=r"00003.jpg is not a readable image .*; replace or delete the file"):
        scoring_sets(splits, 1, None)  # decoding in Ray tasks
    with pytest.raises(UserError, match="00003.jpg is not a readable image"):
        splits.train.dataset[position]  # what a training loader process reads
    # a Ray Train worker meets it: the command prints its header, then ends in that one line, exit code 2 (the
    # worker's traceback stays in Ray's logs)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--level", "high", "--space", "glit_pico", "--data", f"imagefolder:{root}", "--epochs", "1",
                   "--batch-size", "4", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith(f"error: {bad} is not a readable image"), err[-2000:]
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in lines) == 1
    assert not (tmp_path / "run" / "supernet.pt").exists()


@pytest.mark.timeout(600)
def test_224px_supernet_and_search_end_to_end(ray_session, folder224, tmp_path, capsys):
    """The front door on 224-px JPEGs with the defaults a user gets, as a user meets the verdict: the small-data
    recipe, chosen for the folder's 320 training images and said in the header; a supernet of 6 epochs of 10 batches
    that trains (its loss falls) but whose probes stay within the noise of 80 held-out images (P13r: 30 epochs learn),
    so the search stops in one line and keeps it; the same command with --search-unlearnt then searches it, scoring
    on the fixed sets, and best.json says so; the audit's own evaluator scores its networks as the search did."""
    from glit_ray import search as searching
    from glit_ray.core.cli import run as run_command
    from glit_ray.audit import supernet_scores
    from glit_ray.training.data import build_splits
    from glit_ray.searching.results import ranked_architectures, read_candidates
    from glit_ray.runs import search_settings
    from glit_ray.cluster.placement import Placement
    from glit_ray.models.supernet import load_supernet

    data = f"imagefolder:{folder224}"
    run = tmp_path / "search"
    argv = ["--level", "high", "--space", "glit_pico", "--data", data, "--supernet-epochs", "2", "--population", "6",
            "--generations", "2", "--mutations", "3", "--crossovers", "3", "--topk", "3", "--calib-batches", "2",
            "--heldout-images", "40", "--out", str(run)]
    with pytest.raises(SystemExit):
        run_command(searching.main, argv)
    err = capsys.readouterr().err
    assert "recipe: small-data (chosen for 320 training images of 224 px) with --drop-path 0; lr 0.003 = " in err
    refusal = err.strip().splitlines()[-1]
    assert refusal.startswith(f"error: the supernet {run / 'supernet' / 'supernet.pt'} has not learnt: its 5 probe ")
    assert "--search-unlearnt" in refusal and not (run / "candidates").exists()
    net, meta = load_supernet(run / "supernet" / "supernet.pt")
    assert net.patch_embed.img_size == (224, 224) and meta["epochs"] == 2 and meta["last_epoch"]["loss"] > 0
    assert meta["last_epoch"]["loss"] < 0.9 * math.log(10)  # it trains: below the loss of a guess
    last = meta["last_epoch"]  # how long its step waited for the loader processes, and the step's own rate
    assert 0 <= last["input_wait"] < 1 and last["step_images_per_s"] >= last["images_per_s"] > 0

    run_command(searching.main, [*argv, "--search-unlearnt"])  # resumes: the trained supernet is kept
    err = capsys.readouterr().err
    assert "supernet already trained" in err and "searching anyway (--search-unlearnt): the supernet " in err
    best = json.loads((run / "best.json").read_text())
    assert best["supernet"]["searched_unlearnt"] and not best["supernet"]["learnt"]
    rows = read_candidates(run).to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    assert all(r["top1"] * 40 / 100 == pytest.approx(round(r["top1"] * 40 / 100)) for r in rows)  # on 40 images
    assert best["arch"] in {r["arch"] for r in rows}  # what `retrain --arch RUN_DIR` takes

    # the audit scores the networks its search did not score with an evaluator of its own: on these JPEGs, exactly
    # as the search's evaluators did (the same calibration and held-out images, decoded again)
    ranked = ranked_architectures(run)
    scores = supernet_scores(search_settings(run), run / "supernet" / "supernet.pt", build_splits(data, 224, 3),
                             [r["arch"] for r in ranked[:2]], Placement(run))
    assert {a: (s["top1"], s["loss"]) for a, s in scores.items()} == {r["arch"]: (r["top1"], r["loss"])
                                                                      for r in ranked[:2]}


def test_224px_retrain_through_ray_data_exports_a_model(ray_session, folder224, tmp_path):
    """A pico architecture retrains for an epoch with its images decoded by Ray Data, on the CPU its Ray Train worker
    leaves free, its operations compiled (`--torchcompile`, aot_eager: inductor's code generation takes minutes
    here), and reloads as a 224-px model: compiling leaves the checkpoint's keys as they were."""
    import glit_ray
    from glit_ray import retrain as retraining
    from glit_ray.cluster.placement import Placement
    from glit_ray.models.space import SearchSpace

    arch = str(SearchSpace.load("glit_pico").sample("high", random.Random(0)))
    out = tmp_path / "retrain"
    argv = ["--arch", arch, "--space", "glit_pico", "--data", f"imagefolder:{folder224}", "--epochs", "1",
            "--batch-size", "32", "--out", str(out), "--ingest", "ray-data", "--cpus-per-worker", "1",
            "--torchcompile", "aot_eager"]
    args = retraining.build_parser().parse_args(argv)
    metrics = retraining.retrain(retraining.settings_from_args(args), Placement.from_args(args))
    assert metrics["arch"] == arch and 0 <= metrics["test_top1"] <= metrics["test_top5"] <= 100
    [checkpoint] = (out / "train").glob("checkpoint_*/state.pt")
    node = ray_session.get_runtime_context().get_node_id()  # the session's one node
    assert torch.load(checkpoint, weights_only=True)["metrics"]["decoded_on"] == [node]
    model = glit_ray.load_model(out)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
