"""Tests of lightning_repair.data: IDX reading, data discovery, noise, data module."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_repair import data
from lightning_repair.data import (
    IDX_STEMS,
    PAIR_NOISE,
    FashionMNISTDataModule,
    NoisyLabelDataset,
    find_fashion_mnist,
    inject_label_noise,
    read_idx,
)

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file, gzipped if ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def make_fake_fashion_mnist(folder: Path, n_train: int = 600, n_test: int = 100) -> Path:
    """Writes four small random Fashion-MNIST-like IDX files into ``folder``."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28)),
        np.arange(n_train) % 10,
        rng.integers(0, 256, (n_test, 28, 28)),
        np.arange(n_test) % 10,
    )
    for stem, array in zip(IDX_STEMS, arrays):
        write_idx(folder / f"{stem}.gz", array)
    return folder


@pytest.fixture
def no_default(monkeypatch, tmp_path):
    """Points the default location at an empty folder and clears the env var."""
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(data.ENV_VAR, raising=False)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / f"labels-{name}", labels)
    got_images = read_idx(tmp_path / name)
    got_labels = read_idx(tmp_path / f"labels-{name}")
    assert got_images.dtype == torch.uint8 and got_images.shape == (5, 28, 28)
    assert torch.equal(got_images, torch.from_numpy(images))
    assert torch.equal(got_labels, torch.from_numpy(labels))


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_find_argument_wins_over_env(tmp_path, monkeypatch, no_default):
    arg_dir = make_fake_fashion_mnist(tmp_path / "arg", 20, 10)
    env_dir = make_fake_fashion_mnist(tmp_path / "env", 20, 10)
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))
    assert find_fashion_mnist(str(arg_dir)) == arg_dir
    assert find_fashion_mnist() == env_dir


def test_find_default_and_torchvision_layout(tmp_path, monkeypatch, no_default):
    default = make_fake_fashion_mnist(tmp_path / "default", 20, 10)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", default)
    assert find_fashion_mnist() == default
    raw = make_fake_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw", 20, 10)
    assert find_fashion_mnist(str(tmp_path / "tv")) == raw


def test_find_missing_explains_fix(tmp_path, no_default):
    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist()
    message = str(info.value)
    assert "apt-get install" in message and "dataset-fashion-mnist" in message
    assert str(tmp_path / "nowhere") in message and "FASHION_MNIST_DIR" in message


def uniform_labels(n: int = 20_000) -> torch.Tensor:
    """Returns ``n`` synthetic labels, all classes equally frequent."""
    return torch.arange(n) % 10


def test_pairs_noise_rates_and_support():
    labels = uniform_labels()
    original = labels.clone()
    noisy, flipped = inject_label_noise(labels, "pairs", torch.Generator().manual_seed(0))
    assert torch.equal(labels, original)
    assert torch.equal(flipped, torch.nonzero(noisy != labels).flatten())
    assert flipped.dtype == torch.long
    for a, b, p in PAIR_NOISE:
        for src, dst in ((a, b), (b, a)):
            src_mask = labels == src
            assert set(noisy[src_mask].tolist()) == {src, dst}
            assert (noisy[src_mask] == dst).float().mean().item() == pytest.approx(p, abs=0.04)
    paired = {c for a, b, _ in PAIR_NOISE for c in (a, b)}
    for c in set(range(10)) - paired:
        assert torch.equal(noisy[labels == c], labels[labels == c])


def test_symmetric_noise_rate_and_other_class():
    labels = uniform_labels()
    noisy, flipped = inject_label_noise(labels, "symmetric", torch.Generator().manual_seed(0))
    assert len(flipped) / len(labels) == pytest.approx(0.2, abs=0.02)
    assert torch.equal(flipped, torch.nonzero(noisy != labels).flatten())
    # Every flipped class reaches all nine others, roughly equally often.
    counts = torch.bincount(noisy[flipped][labels[flipped] == 3], minlength=10)
    assert counts[3] == 0 and (counts[torch.arange(10) != 3] > 0).all()
    _, flipped_half = inject_label_noise(
        labels, "symmetric", torch.Generator().manual_seed(0), rate=0.5
    )
    assert len(flipped_half) / len(labels) == pytest.approx(0.5, abs=0.02)


def test_none_noise_and_bad_arguments():
    labels = uniform_labels(100)
    noisy, flipped = inject_label_noise(labels, "none", torch.Generator())
    assert torch.equal(noisy, labels) and noisy is not labels and len(flipped) == 0
    with pytest.raises(ValueError, match="symmetric"):
        inject_label_noise(labels, "bogus", torch.Generator())
    with pytest.raises(ValueError, match="only applies"):
        inject_label_noise(labels, "pairs", torch.Generator(), rate=0.1)


def test_noisy_label_dataset_item():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[1] = 255
    dataset = NoisyLabelDataset(images, torch.tensor([4, 7]))
    x, y = dataset[1]
    assert len(dataset) == 2 and y == 7 and isinstance(y, int)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.2860) / 0.3530)


@pytest.fixture
def fake_dir(tmp_path):
    return make_fake_fashion_mnist(tmp_path / "fmnist")


def test_datamodule_splits_and_noise(fake_dir):
    dm = FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, batch_size=32)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (500, 100, 100)
    assert torch.equal(
        dm.flipped_indices,
        torch.nonzero(dm.train_dataset.labels != dm.clean_train_labels).flatten(),
    )
    assert len(dm.flipped_indices) > 0
    # Validation and test labels are clean: the fake labels are index % 10.
    images = read_idx(fake_dir / f"{IDX_STEMS[0]}.gz")
    clean = read_idx(fake_dir / f"{IDX_STEMS[1]}.gz").long()
    rows = {bytes(img.numpy()): i for i, img in enumerate(images)}
    val_idx = torch.tensor([rows[bytes(img.numpy())] for img in dm.val_dataset.images])
    assert torch.equal(dm.val_dataset.labels, clean[val_idx])
    assert torch.equal(dm.test_dataset.labels, torch.arange(100) % 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)


def test_datamodule_is_deterministic_and_subsets(fake_dir):
    first = FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, seed=3)
    second = FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, seed=3)
    other = FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, seed=4)
    for dm in (first, second, other):
        dm.setup("fit")
    assert torch.equal(first.train_dataset.images, second.train_dataset.images)
    assert torch.equal(first.flipped_indices, second.flipped_indices)
    assert not torch.equal(first.train_dataset.images, other.train_dataset.images)
    subset = FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, train_subset=50)
    subset.setup("fit")
    assert len(subset.train_dataset) == 50 and len(subset.clean_train_labels) == 50
    assert torch.equal(
        subset.flipped_indices,
        torch.nonzero(subset.train_dataset.labels != subset.clean_train_labels).flatten(),
    )
    with pytest.raises(ValueError, match="train_subset"):
        FashionMNISTDataModule(data_dir=str(fake_dir), val_size=100, train_subset=501).setup()


def test_datamodule_validates_arguments():
    with pytest.raises(ValueError, match="pairs"):
        FashionMNISTDataModule(noise="bogus")
    with pytest.raises(ValueError, match="val_size"):
        FashionMNISTDataModule(val_size=60_000)
    with pytest.raises(ValueError, match="noise_rate"):
        FashionMNISTDataModule(noise="pairs", noise_rate=0.3)


def test_real_fashion_mnist_pairs_noise():
    if not REAL_DIR.is_dir():
        pytest.skip(f"{REAL_DIR} missing; apt-get install -y dataset-fashion-mnist")
    dm = FashionMNISTDataModule(data_dir=str(REAL_DIR), noise="pairs")
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (
        50_000,
        10_000,
        10_000,
    )
    # Six of ten classes flip: T-shirt/Shirt and Pullover/Coat at 0.4, Sneaker/Boot at 0.3.
    expected = sum(
        p * (dm.clean_train_labels == c).float().mean().item()
        for a, b, p in PAIR_NOISE
        for c in (a, b)
    )
    assert len(dm.flipped_indices) / 50_000 == pytest.approx(expected, abs=0.01)
    assert expected == pytest.approx(0.22, abs=0.01)
