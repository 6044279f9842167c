"""Shared tiny models and data for the curvature and influence tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The tests use tiny tensors: intra-op threads only add synchronisation, which on a shared 2-core machine makes a
# 6×6 convolution take ~20 ms instead of ~0.1 ms. One thread keeps every test file well under its time budget.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Trainers with ``logger=False`` write their logs (and the suspects CSVs) under the current directory: run
    every test in its own temporary one, so the checkout stays clean."""
    monkeypatch.chdir(tmp_path)


def tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """4 → 5 → 3 MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def tiny_cnn(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """(B, 1, 6, 6) → 3 logits: conv, relu, max-pool, conv, relu, global average pool, linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(dtype)


def tiny_inputs(kind: str, n: int, dtype: torch.dtype = torch.float64,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs for ``tiny_mlp`` (``kind="mlp"``) or ``tiny_cnn`` (``kind="cnn"``) and labels in [0, 3)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 4) if kind == "mlp" else (n, 1, 6, 6)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


MODELS = {"mlp": tiny_mlp, "cnn": tiny_cnn}


@pytest.fixture(params=["mlp", "cnn"])
def model_kind(request) -> str:
    """Runs a test once with the MLP and once with the CNN."""
    return request.param


@pytest.fixture(autouse=True)
def restore_default_dtype():
    """Tests may set the default dtype (see ``test_curvature.prepared``); put it back afterwards."""
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own folder, so Trainer defaults (``lightning_logs/``, ``repair/``) land there."""
    monkeypatch.chdir(tmp_path)
