import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from glit_ray.core.errors import UserError
from glit_ray.training.data import build_splits, load_digits, make_loader, mixup_for
from glit_ray.training.loaders import training_loader
from glit_ray.training.recipe import PRESETS


@pytest.fixture
def no_checksums(monkeypatch):
    """Hand-written CIFAR batches cannot carry the published md5 sums: check presence instead."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_cifar(root, kind="cifar10", per_batch=10, classes=10):
    rng = np.random.default_rng(0)
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == "cifar10" else ["train", "test"]
    for name in names:
        batch = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta_name, meta_key = ("batches.meta", "label_names") if kind == "cifar10" else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))
    return folder


def write_imagefolder(root, classes=("cat", "dog", "fox"), per_class=10, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class if split == "train" else 3):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def assert_disjoint_views(splits):
    train, heldout = set(splits.train.indices), set(splits.heldout.indices)
    assert not train & heldout


def test_digits_splits_are_real_disjoint_and_fixed():
    splits = build_splits("digits", 8, 1)
    assert (len(splits.train), len(splits.heldout), len(splits.test)) == (1150, 288, 359)
    assert splits.num_classes == 10 and not splits.natural_images
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.long
    # no image appears in two splits
    seen = {}
    for name in ("train", "heldout", "test"):
        for image in getattr(splits, name).tensors[0]:
            seen.setdefault(image.numpy().tobytes(), set()).add(name)
    assert len(seen) == 1797 and all(len(names) == 1 for names in seen.values())
    again = build_splits("digits", 8, 1)
    assert torch.equal(again.heldout.tensors[0], splits.heldout.tensors[0])
    assert torch.allclose(splits.train.tensors[0].mean(), torch.tensor(0.0), atol=1e-5)


def test_the_shipped_digits_are_scikit_learns():
    from sklearn.datasets import load_digits as scikit_learns

    images, labels = load_digits()
    theirs = scikit_learns()
    assert images.dtype == labels.dtype == np.uint8
    assert np.array_equal(images, theirs.images) and np.array_equal(labels, theirs.target)


def test_digits_follow_the_spaces_input_shape():
    splits = build_splits("digits", 16, 3)
    assert splits.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("kind, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_a_local_folder(tmp_path, no_checksums, kind, classes):
    folder = write_cifar(tmp_path, kind, per_batch=20 if kind == "cifar10" else 100, classes=classes)
    for path in (tmp_path, folder):  # the root or the batches folder itself
        splits = build_splits(f"{kind}:{path}", 32, 3)
        n_train = 100 if kind == "cifar10" else 100
        assert len(splits.train) + len(splits.heldout) == n_train
        assert len(splits.heldout) == 20 and splits.num_classes == classes and splits.natural_images
        assert_disjoint_views(splits)
        x, y = splits.train[0]
        assert x.shape == (3, 32, 32) and isinstance(y, int)
        assert splits.heldout[0][0].shape == splits.test[0][0].shape == (3, 32, 32)


def test_cifar_without_checksum_patch_rejects_hand_written_files(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(UserError, match="not a complete cifar10 folder"):
        build_splits(f"cifar10:{tmp_path}", 32, 3)


def test_cifar_missing_and_corrupt(tmp_path, no_checksums):
    with pytest.raises(UserError, match="does not exist: point cifar10:PATH at the local copy"):
        build_splits(f"cifar10:{tmp_path / 'nowhere'}", 32, 3)
    with pytest.raises(UserError, match="not a complete cifar10 folder"):
        build_splits(f"cifar10:{tmp_path}", 32, 3)
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="a batch file is corrupt"):
        build_splits(f"cifar10:{tmp_path}", 32, 3)


def test_imagefolder_with_deit_transforms(tmp_path):
    write_imagefolder(tmp_path)
    splits = build_splits(f"imagefolder:{tmp_path}", 32, 3)
    assert splits.num_classes == 3 and len(splits.test) == 9
    assert len(splits.train) == 24 and len(splits.heldout) == 6
    assert_disjoint_views(splits)
    train_tf = splits.train.dataset.transform
    names = " ".join(type(t).__name__ for t in train_tf.transforms)
    assert "RandAugment" in names and "RandomErasing" not in names  # erasing runs on the device (DeviceAugment)
    assert splits.train[0][0].shape == splits.heldout[0][0].shape == splits.test[0][0].shape == (3, 32, 32)
    assert splits.train[0][0].dtype == splits.heldout[0][0].dtype == torch.uint8
    # held-out images are read with the deterministic eval transform
    assert torch.equal(splits.heldout[0][0], splits.heldout[0][0])


def test_imagefolder_errors(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "0.png")
    with pytest.raises(UserError, match="val is missing"):
        build_splits(f"imagefolder:{tmp_path}", 32, 3)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="put images in one sub-folder per class"):
        build_splits(f"imagefolder:{tmp_path}", 32, 3)
    with pytest.raises(UserError, match="RGB images but the search space takes in_chans 1"):
        build_splits(f"imagefolder:{tmp_path}", 8, 1)


def test_imagefolder_class_mismatch(tmp_path):
    write_imagefolder(tmp_path)
    write_imagefolder(tmp_path / "other", classes=("owl",))
    (tmp_path / "other" / "val" / "owl").rename(tmp_path / "val" / "owl")
    with pytest.raises(UserError, match="test split's classes differ"):
        build_splits(f"imagefolder:{tmp_path}", 32, 3)


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "digits:/tmp", "imagefolder:"])
def test_unknown_spec(spec):
    with pytest.raises(UserError, match="unknown dataset"):
        build_splits(spec, 8, 1)


def test_mixup_only_where_the_recipe_mixes(tmp_path):
    assert mixup_for(build_splits("digits", 8, 1), PRESETS["small-data"]) is None
    write_imagefolder(tmp_path)
    mixup = mixup_for(build_splits(f"imagefolder:{tmp_path}", 32, 3), PRESETS["deit"])
    x, y = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
    assert y.max() < 1  # DeiT's label smoothing on the mixed targets


def test_training_loader_is_seeded_and_drops_the_last_batch():
    splits = build_splits("digits", 8, 1)
    first = [y.tolist() for _, y in make_loader(splits.train, 100, train=True, seed=3)]
    again = [y.tolist() for _, y in make_loader(splits.train, 100, train=True, seed=3)]
    assert first == again and len(first) == 11 and all(len(b) == 100 for b in first)
    assert [y for _, y in make_loader(splits.heldout, 100, train=False)][-1].shape == (88,)


def test_a_batch_per_worker_must_fit_in_the_training_split():
    # drop_last on every shard: a batch larger than a shard would make an epoch of no step (timm's scheduler asserts)
    splits, cpu = build_splits("digits", 8, 1), torch.device("cpu")
    half = len(splits.train) // 2
    assert len(training_loader(splits, half, 0, 0, cpu, world=2, rank=1)) == 1
    message = f"a batch of {half + 1} on each of 2 worker\\(s\\) is more than the {len(splits.train)}"
    with pytest.raises(UserError, match=message):
        training_loader(splits, half + 1, 0, 0, cpu, world=2, rank=1)
