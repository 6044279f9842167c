"""Fashion-MNIST loading, label-noise injection and the Lightning data module.

The data are read straight from the four IDX files (gzipped or plain), so no
download happens at training time. Noise is injected into the training split
only and the indices of the flipped examples are kept, which lets the
identification methods be scored against the ground truth.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)

# Pixel statistics of the Fashion-MNIST training set, after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
ENV_VAR = "FASHION_MNIST_DIR"
# Where Debian's ``dataset-fashion-mnist`` package installs the gzipped files.
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# Sub-folder torchvision's ``FashionMNIST(root, download=True)`` writes to.
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"

# Visually similar class pairs (a, b, p): each example of a becomes b with
# probability p, and each example of b becomes a with the same probability.
PAIR_NOISE = (
    (0, 6, 0.4),  # T-shirt/top <-> Shirt
    (2, 4, 0.4),  # Pullover <-> Coat
    (7, 9, 0.3),  # Sneaker <-> Ankle boot
)
DEFAULT_SYMMETRIC_RATE = 0.2
NOISE_KINDS = ("none", "pairs", "symmetric")

_IDX_UBYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """Reads an unsigned-byte IDX file, gzipped (``.gz``) or plain.

    Args:
        path: The IDX file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        A ``torch.uint8`` tensor shaped as the file's dimensions, e.g.
        ``(N, 28, 28)`` for images or ``(N,)`` for labels.

    Raises:
        ValueError: If the file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: bad magic number.")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise ValueError(
            f"{path} holds IDX type 0x{dtype_code:02x}; only unsigned bytes (0x08) are supported."
        )
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape}, "
            f"found {data.size} bytes of data."
        )
    # Copy: frombuffer views read-only bytes, which torch cannot own.
    return torch.from_numpy(data.reshape(shape).copy())


def _idx_file(folder: Path, stem: str) -> Path | None:
    """Returns the gzipped or plain IDX file for ``stem`` in ``folder``.

    Args:
        folder: The folder to look in.
        stem: The file name without ``.gz``, e.g. ``"t10k-labels-idx1-ubyte"``.

    Returns:
        The existing file (gzipped preferred), or None if neither exists.
    """
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _holds_fashion_mnist(folder: Path) -> bool:
    """Tells whether ``folder`` holds all four Fashion-MNIST IDX files.

    Args:
        folder: The folder to check.

    Returns:
        True if every file of ``IDX_STEMS`` is there, gzipped or plain.
    """
    return all(_idx_file(folder, stem) is not None for stem in IDX_STEMS)


def find_fashion_mnist(data_dir: str | None = None) -> Path:
    """Finds the folder holding the four Fashion-MNIST IDX files.

    An explicit location is authoritative: if ``data_dir`` (or else the
    ``FASHION_MNIST_DIR`` environment variable) is set, only it is searched,
    so a typo is reported instead of silently using other data. Otherwise
    ``DEFAULT_DATA_DIR`` is searched. Each location is checked directly and in
    torchvision's layout ``<dir>/FashionMNIST/raw``.

    Args:
        data_dir: Folder with the IDX files, or None to use the environment
            variable or the default location.

    Returns:
        The folder that holds all four files.

    Raises:
        FileNotFoundError: If no searched folder holds all four files.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
    else:
        root = DEFAULT_DATA_DIR
    candidates = (root, root / TORCHVISION_SUBDIR)
    for folder in candidates:
        if _holds_fashion_mnist(folder):
            return folder
    looked = "\n".join(f"  - {folder}" for folder in candidates)
    files = ", ".join(f"{stem}(.gz)" for stem in IDX_STEMS)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({files}) not found. Looked in:\n{looked}\n"
        "To fix: on Debian/Ubuntu run `apt-get install -y dataset-fashion-mnist` "
        f"(installs them into {DEFAULT_DATA_DIR}), or pass data_dir= or set "
        f"{ENV_VAR} to a folder holding the IDX files."
    )


def inject_label_noise(
    labels: torch.Tensor,
    kind: str,
    generator: torch.Generator,
    rate: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips labels at random to simulate annotation errors.

    Every example is flipped independently (Bernoulli draws), so the number of
    flips varies around its expectation. Kinds:

    - ``"pairs"``: each example of a class in ``PAIR_NOISE`` moves to its
      partner class with the pair's probability; other classes stay.
    - ``"symmetric"``: each example moves with probability ``rate`` (default
      ``DEFAULT_SYMMETRIC_RATE``) to a uniformly chosen *other* class.
    - ``"none"``: no change.

    Args:
        labels: 1-D integer tensor of clean labels in ``[0, NUM_CLASSES)``,
            on the CPU. Not modified.
        kind: One of ``NOISE_KINDS``.
        generator: CPU random generator, for reproducible noise.
        rate: Flip probability for ``"symmetric"``; must be None otherwise.

    Returns:
        ``(noisy_labels, flipped_indices)``: a new long tensor of labels and the
        sorted long tensor of positions where it differs from ``labels``.

    Raises:
        ValueError: On an unknown kind, a rate given for a kind other than
            ``"symmetric"``, a rate outside [0, 1], or labels that are not a
            1-D integer tensor.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"Unknown noise kind {kind!r}; valid kinds are {NOISE_KINDS}.")
    if rate is not None and kind != "symmetric":
        raise ValueError(
            f"rate={rate} only applies to noise kind 'symmetric', not {kind!r}; drop it."
        )
    if rate is not None and not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D integer tensor, got dtype {labels.dtype} and shape "
            f"{tuple(labels.shape)}."
        )
    clean = labels.long()
    noisy = clean.clone()
    if kind == "pairs":
        draws = torch.rand(len(clean), generator=generator)
        for a, b, p in PAIR_NOISE:
            # Masks use the clean labels so no example is flipped twice.
            noisy[(clean == a) & (draws < p)] = b
            noisy[(clean == b) & (draws < p)] = a
    elif kind == "symmetric":
        p = DEFAULT_SYMMETRIC_RATE if rate is None else rate
        flip = torch.rand(len(clean), generator=generator) < p
        # A shift in [1, C) never lands on the same class and is uniform over the others.
        shift = torch.randint(1, NUM_CLASSES, (len(clean),), generator=generator)
        noisy[flip] = (clean[flip] + shift[flip]) % NUM_CLASSES
    flipped = torch.nonzero(noisy != clean).flatten()
    return noisy, flipped


class NoisyLabelDataset(Dataset):
    """Map-style dataset of Fashion-MNIST images with (possibly noisy) labels.

    Attributes:
        images: ``torch.uint8`` tensor of shape ``(N, 28, 28)``.
        labels: ``torch.long`` tensor of shape ``(N,)``; the labels the model
            is trained on, readable without iterating the dataset.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Wraps images and labels.

        Args:
            images: ``torch.uint8`` tensor of shape ``(N, H, W)``.
            labels: Integer tensor of shape ``(N,)``.

        Raises:
            ValueError: If the dtypes or shapes do not match the above.
        """
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, H, W), got dtype "
                f"{images.dtype} and shape {tuple(images.shape)}."
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"labels must have shape ({len(images)},) to match the images, "
                f"got {tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        """Returns the number of examples."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns one normalized image and its label.

        Args:
            index: Position of the example.

        Returns:
            ``(x, y)``: ``x`` is a float32 tensor of shape ``(1, H, W)``, scaled to
            [0, 1] and standardized with the Fashion-MNIST mean and std; ``y``
            is the label as a Python int.
        """
        x = self.images[index].float().div(255.0)
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return x.unsqueeze(0), int(self.labels[index])


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST with a seeded train/val split and noise on the train split.

    Attributes (set by ``setup``):
        train_dataset: Training split, with noisy labels.
        val_dataset: Validation split, clean labels.
        test_dataset: The t10k files, clean labels.
        flipped_indices: Sorted long tensor of indices into ``train_dataset``
            whose label was flipped.
        clean_train_labels: Long tensor of the training labels before noise.
        class_names: The ten class names, for reports.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        val_size: int = 10_000,
        train_subset: int | None = None,
        noise: str = "pairs",
        noise_rate: float | None = None,
        seed: int = 0,
    ) -> None:
        """Stores and validates the settings; no file is read yet.

        Args:
            data_dir: Folder with the IDX files; None searches as
                ``find_fashion_mnist`` does.
            batch_size: Examples per batch.
            num_workers: DataLoader worker processes.
            val_size: Training images held out for validation; the rest train.
            train_subset: If set, keep only this many (seeded, random) training
                examples, e.g. 3000 for the low-data regime of Tanno et al.
            noise: Label noise on the training split: one of ``NOISE_KINDS``.
            noise_rate: Flip probability for ``noise="symmetric"``; None uses
                ``DEFAULT_SYMMETRIC_RATE``.
            seed: Seed of the split, the subset and the noise.

        Raises:
            ValueError: If an argument is out of range or inconsistent.
        """
        super().__init__()
        if noise not in NOISE_KINDS:
            raise ValueError(f"Unknown noise {noise!r}; valid values are {NOISE_KINDS}.")
        if noise_rate is not None and noise != "symmetric":
            raise ValueError(
                f"noise_rate={noise_rate} only applies to noise='symmetric', not {noise!r}; "
                "drop noise_rate or set noise='symmetric'."
            )
        if noise_rate is not None and not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}.")
        if not 0 < val_size < 60_000:
            raise ValueError(
                f"val_size must be between 1 and 59,999 (Fashion-MNIST has 60,000 "
                f"training images), got {val_size}."
            )
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be at least 1 or None, got {train_subset}.")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.train_subset = train_subset
        self.noise = noise
        self.noise_rate = noise_rate
        self.seed = seed
        self.train_dataset: NoisyLabelDataset | None = None
        self.val_dataset: NoisyLabelDataset | None = None
        self.test_dataset: NoisyLabelDataset | None = None
        self.flipped_indices: torch.Tensor | None = None
        self.clean_train_labels: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        """Reads the files and builds all three splits, once for every stage.

        Args:
            stage: Lightning stage (``"fit"``, ``"test"``, ...); all splits are
                built whatever the stage, since reading them is cheap.

        Raises:
            FileNotFoundError: If the IDX files cannot be found.
            ValueError: If ``val_size`` or ``train_subset`` exceed the data.
        """
        if self.train_dataset is not None:
            return
        folder = find_fashion_mnist(self.data_dir)
        images, labels, test_images, test_labels = (
            read_idx(_idx_file(folder, stem)) for stem in IDX_STEMS
        )
        n = len(labels)
        if self.val_size >= n:
            raise ValueError(
                f"val_size={self.val_size} leaves no training data: {folder} holds {n} "
                "training images. Lower val_size."
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=generator)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_subset is not None:
            if self.train_subset > len(train_idx):
                raise ValueError(
                    f"train_subset={self.train_subset} exceeds the {len(train_idx)} training "
                    "examples left after the validation split. Lower it or val_size."
                )
            # The split order is already a seeded shuffle, so its head is a random subset.
            train_idx = train_idx[: self.train_subset]
        clean = labels[train_idx].long()
        noisy, flipped = inject_label_noise(clean, self.noise, generator, self.noise_rate)
        self.clean_train_labels = clean
        self.flipped_indices = flipped
        self.train_dataset = NoisyLabelDataset(images[train_idx], noisy)
        self.val_dataset = NoisyLabelDataset(images[val_idx], labels[val_idx])
        self.test_dataset = NoisyLabelDataset(test_images, test_labels)

    def _loader(self, dataset: NoisyLabelDataset | None, shuffle: bool) -> DataLoader:
        """Builds a DataLoader with the module's batch size and workers.

        Args:
            dataset: The split to load; None if ``setup`` has not run.
            shuffle: Whether to reshuffle every epoch.

        Returns:
            The DataLoader.

        Raises:
            RuntimeError: If ``setup`` has not been called yet.
        """
        if dataset is None:
            raise RuntimeError("FashionMNISTDataModule.setup() must be called before the loaders.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Returns the shuffled loader of the (noisy) training split."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Returns the loader of the validation split, in fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Returns the loader of the test split, in fixed order."""
        return self._loader(self.test_dataset, shuffle=False)
