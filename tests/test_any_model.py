"""Models people actually train repair with the defaults: torchvision's ResNet-18 and ViT, in-place activations,
residual additions, functional calls and ``x.view``, with no ``params`` and no edits to the model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from helpers import TinyClassifier
from lightning_repair import RepairCallback
from lightning_repair.treat import EWCUnlearning, Finetune



class Patterns(Dataset):
    """Images whose class sets a fixed random pattern, plus noise; a share of labels flipped."""

    def __init__(self, n: int, shape: tuple[int, ...], classes: int = 4, flip: float = 0.2, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.randn(classes, *shape, generator=torch.Generator().manual_seed(99))
        self.clean = torch.randint(classes, (n,), generator=generator)
        self.x = patterns[self.clean] + 1.5 * torch.randn(n, *shape, generator=generator)
        flipped = torch.rand(n, generator=generator) < flip
        self.y = torch.where(flipped, (self.clean + 1) % classes, self.clean)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], int(self.y[index])


class Classifier(TinyClassifier):
    """Any network as a LightningModule, trained with cross-entropy."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(lr=1e-3)
        self.net = net


class FunctionalResidual(nn.Module):
    """A residual block written with functional calls and in-place ReLUs, BatchNorm inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc, self.bn, self.head = nn.Linear(64, 32), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.stem(x.flatten(1)), inplace=True)
        h = F.relu(h + self.bn(self.fc(h)), inplace=True)
        return self.head(h)


class ViewCNN(nn.Module):
    """A convolution, then ``x.view`` in ``forward`` instead of an ``nn.Flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.head(h.view(h.size(0), -1))


def resnet18() -> nn.Module:
    net = torchvision.models.resnet18(num_classes=4)
    net.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)  # 1 channel, small input: the usual CIFAR-style stem
    return net


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=4)


MODELS = {
    "resnet18": (resnet18, (1, 16, 16), 160),
    "functional_residual": (FunctionalResidual, (1, 8, 8), 300),
    "view_cnn": (ViewCNN, (1, 8, 8), 300),
    "vision_transformer": (tiny_vit, (3, 16, 16), 200),
}


def _one_round(name: str, tmp_path, **settings):
    build, shape, n_train = MODELS[name]
    torch.manual_seed(0)
    model = Classifier(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, validation = Patterns(n_train, shape), Patterns(100, shape, flip=0.0, seed=1)
    repair = RepairCallback(start_epoch=0, **settings)
    trainer = pl.Trainer(max_epochs=1, callbacks=[repair], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(validation, batch_size=50))

    [record] = repair.rounds
    assert record["failures"] > 0 and record.get("skipped") is None
    # The user's module keeps its own in-place flags.
    if name == "resnet18":
        assert model.net.relu.inplace is True
    assert before.keys() == model.state_dict().keys()
    return record


@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_as_written_repairs_with_the_defaults(name, tmp_path):
    record = _one_round(name, tmp_path)
    assert record["curvature"] is None  # KNN-Shapley and Exclude need no per-example gradients or Fisher
    assert record["accepted"] and record["removed"] == record["causes"] > 0  # the causes left training


@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_as_written_is_fine_tuned_without_its_causes(name, tmp_path):
    record = _one_round(name, tmp_path, treatment=Finetune())
    assert record["curvature"] is None  # fine-tuning needs no per-example gradients or Fisher either
    assert record["candidates_rated"] >= 1  # the treatment ran to the end and its candidates were judged


@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_as_written_gets_its_fisher_from_torch_func(name, tmp_path):
    # In-place additions on hooked outputs, x.view between modules, LayerNorm and attention all stop BackPACK's
    # Fisher (each fails with curvature="backpack"); the callback falls back to torch.func.
    record = _one_round(name, tmp_path, treatment=EWCUnlearning())
    assert record["curvature"] == "torch_func" and record["candidates_rated"] >= 1


def _methods():
    from lightning_repair.identify import EWCInfluence, GradientDot, KNNShapley, LinearInfluence, TrainingLoss
    from lightning_repair.treat import EnergyAlignment, EWCUnlearning, Finetune, NewtonRemoval

    scorers = [EWCInfluence(max_steps=5), LinearInfluence(), GradientDot(), KNNShapley(), TrainingLoss()]
    treatments = [NewtonRemoval(lissa_steps=5), Finetune(steps=4), EnergyAlignment(fit_steps=3, finetune_steps=3)]
    return ([(s, EWCUnlearning(max_steps=4)) for s in scorers]
            + [(TrainingLoss(), t) for t in treatments])


@pytest.mark.parametrize("name", ["functional_residual", "vision_transformer"])
@pytest.mark.parametrize("method", range(len(_methods())), ids=lambda i: "-".join(
    type(m).__name__ for m in _methods()[i]))
def test_every_scorer_and_treatment_runs_where_backpack_cannot(name, method):
    # Linear influence and gradient dot fall back from forward-mode AD to per-example gradients on the ViT;
    # Newton's Hessian-vector products need attention's math kernel (the fused ones have no second derivative).
    build, shape, n_train = MODELS[name]
    scorer, treatment = _methods()[method]
    torch.manual_seed(0)
    repair = RepairCallback(scorer=scorer, treatment=treatment, start_epoch=0, fisher_samples=32, top_k=10)
    pl.Trainer(max_epochs=1, callbacks=[repair], accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(
        Classifier(build()), DataLoader(Patterns(n_train, shape), batch_size=32, shuffle=True),
        DataLoader(Patterns(100, shape, flip=0.0, seed=1), batch_size=50))
    [record] = repair.rounds
    assert record.get("skipped") is None and record["causes"] == 10 and record["candidates_rated"] >= 1


class Branching(nn.Module):
    """Python control flow on a tensor's value: fine for autograd and BackPACK, impossible under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(x if x.sum() > 0 else -x)


def test_torch_func_says_what_it_cannot_follow():
    from lightning_repair.curvature import per_example_gradients

    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="one example at a time.*params="):
        per_example_gradients(Branching(), x, y, backend="torch_func")


def test_torch_func_is_refused_by_name():
    with pytest.raises(ValueError, match="curvature must be"):
        RepairCallback(curvature="functorch")


def _resnet_batch():
    torch.manual_seed(0)
    return [(torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1]))]


def test_forced_backpack_names_where_a_resnet_changes_a_layers_output_in_place():
    # torchvision adds the shortcut with `out += identity` on bn2's output, which BackPACK's hooks wrap; PyTorch's
    # own error ("Output 0 of BackwardHookFunction is a view ...") names no layer.
    from lightning_repair.curvature import diagonal_fisher
    from lightning_repair.params import repair_copy

    with pytest.raises(ValueError, match=r"in-place operation right after `layer1\.0\.bn2` ran.*curvature='torch_func'"):
        diagonal_fisher(repair_copy(resnet18()), _resnet_batch(), "empirical", backend="backpack")


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_backpack_follows_a_resnets_head_alone_and_agrees_with_torch_func(kind):
    # Restricted to `fc`, the body needs no gradient: its in-place additions and the ReLU module each block runs
    # twice are never visited by BackPACK, so they must not stop it.
    from lightning_repair.curvature import diagonal_fisher
    from lightning_repair.params import repair_copy

    model = repair_copy(resnet18(), params=["fc"])
    by_backpack = diagonal_fisher(model, _resnet_batch(), kind, backend="backpack")
    by_torch_func = diagonal_fisher(model, _resnet_batch(), kind, backend="torch_func")
    assert len(by_backpack) == 2  # fc.weight, fc.bias
    for a, b in zip(by_backpack, by_torch_func):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
