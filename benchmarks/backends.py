"""What each curvature backend costs, in training epochs, on the paper CNN and on torchvision's ResNet-18.

    python -m benchmarks.backends                 # N = 3,000 Fashion-MNIST images, 1,000 Fisher samples
    python -m benchmarks.backends --n 500 --fisher-samples 100 --repeats 1   # a quick look

For each model: one training epoch over N images (Adam, batch 64) is the unit; then the MC, empirical and exact
Fisher over ``--fisher-samples`` images with BackPACK and with ``torch.func``, and the per-example gradients of the
same images with BackPACK, BackPACK after its torch.fx converter, and ``torch.func``; each timed in the same
process (median of ``--repeats``), on the callback's repair copy of the model (eval mode, activations out of
place). Where BackPACK cannot follow the model, its row says why. Writes
``benchmarks/results/backends.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from backpack import backpack, extend
from backpack.extensions import BatchGrad
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from benchmarks.environment import environment
from benchmarks.report import failure
from lightning_repair.curvature import BACKENDS, FISHER_KINDS, diagonal_fisher, per_example_gradients
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.models import paper_cnn
from lightning_repair.params import repair_copy

RESULTS = Path(__file__).resolve().parent / "results"


def resnet18() -> nn.Module:
    """torchvision's resnet18 as written, its first convolution taking 1 channel, as ``examples/resnet_repair.py``
    builds it (torchvision's own stem: 7×7 stride 2, then the max-pool; the small-image stem, 3×3 without the
    max-pool, trains about 5× slower on a CPU)."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


MODELS: dict[str, Callable[[], nn.Module]] = {"paper CNN": paper_cnn, "ResNet-18": resnet18}


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_epoch(model: nn.Module, loader: DataLoader) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()


CONVERTER = "backpack, use_converter=True"


def converted_gradients(model: nn.Module) -> Callable[[DataLoader], None]:
    """Per-example gradients by BackPACK's ``BatchGrad`` on ``extend(model, use_converter=True)``: BackPACK's
    torch.fx rewrite, which turns residual additions and functional calls into modules. Only its first-order
    extensions follow a ResNet that way (``DiagGGN*`` stop at its ``SumModule``), so it could serve the MC Fisher
    only through per-example gradients, as ``torch.func`` does; the library does not use it (README, *Limits*)."""
    converted = extend(copy.deepcopy(model), use_converter=True)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run(loader: DataLoader) -> None:
        for x, y in loader:
            with backpack(BatchGrad()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss_fn(converted(x), y).backward()
            for p in converted.parameters():
                p.grad, p.grad_batch = None, None
    return run


def per_example_pass(model: nn.Module, backend: str) -> Callable[[DataLoader], None]:
    if backend == CONVERTER:
        return converted_gradients(model)

    def run(loader: DataLoader) -> None:
        for x, y in loader:
            per_example_gradients(model, x, y, backend=backend)  # one batch's gradients at a time, then dropped
    return run


def _row(name: str, quantity: str, backend: str, work: Callable[[], object], repeats: int,
         epoch: float) -> list[str]:
    try:
        seconds = median_seconds(work, repeats)
        return [name, quantity, backend, f"{seconds:.1f} s", f"{seconds / epoch:.2f}"]
    except Exception as error:  # noqa: BLE001 - the row reports what stopped the backend
        return [name, quantity, backend, f"fails: {failure(error, 90)}", "—"]


def measure(name: str, train, sample, repeats: int, kinds: list[str]) -> list[list[str]]:
    torch.manual_seed(0)
    model = MODELS[name]()
    epoch = median_seconds(lambda: train_epoch(model, DataLoader(train, batch_size=64, shuffle=True)), repeats)
    rows = [[name, "training epoch", "—", f"{epoch:.1f} s", "1.00"]]
    copy_ = repair_copy(model)  # what the callback differentiates: eval mode, activations out of place
    loader = DataLoader(sample, batch_size=64)
    for kind in kinds:
        for backend in BACKENDS:
            rows.append(_row(name, f"{kind} Fisher", backend,
                             lambda: diagonal_fisher(copy_, loader, kind, backend=backend), repeats, epoch))
    for backend in ("backpack", CONVERTER, "torch_func"):  # the converter's time includes its torch.fx rewrite
        rows.append(_row(name, "per-example gradients", backend,
                         lambda: per_example_pass(copy_, backend)(loader), repeats, epoch))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="training images; one epoch over them is the unit")
    parser.add_argument("--fisher-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", choices=FISHER_KINDS, default=list(FISHER_KINDS),
                        help="Fisher kinds (exact costs one per-example gradient per class)")
    parser.add_argument("--output", type=Path, default=RESULTS / "backends.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = FashionMNISTDataModule(train_subset=args.n, seed=0)
    data.setup("fit")
    train = data.train_dataset
    sample = Subset(train, range(min(args.fisher_samples, len(train))))
    rows = [row for name in MODELS for row in measure(name, train, sample, args.repeats, args.kinds)]
    machine = environment()
    lines = ["# Curvature backends: cost in training epochs",
             f"Made by `python -m benchmarks.backends --n {args.n} --fisher-samples {args.fisher_samples} "
             f"--repeats {args.repeats} --threads {args.threads} --kinds {' '.join(args.kinds)}`; median of {args.repeats}, all in one process. "
             f"One epoch = one pass of Adam over {args.n:,} images; each Fisher averages over "
             f"{len(sample):,} of them. Machine: {machine.get('cpu', '?')}, torch {torch.__version__}. ResNet-18 is "
             "torchvision's as written, its first convolution taking 1 channel (as in `examples/resnet_repair.py`). "
             "Every row runs on the callback's repair copy (eval mode, activations out of place). BackPACK's "
             f"`{CONVERTER}` rows include its torch.fx rewrite; its second-order extensions stop at the rewritten "
             "residual additions, so an MC Fisher through it would cost at least its per-example gradients (at "
             "sampled labels, then squared), against torch.func's `mc Fisher` row.",
             "| model | quantity | backend | time | ÷ one epoch |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    args.output.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
