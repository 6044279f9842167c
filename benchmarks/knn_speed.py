"""What KNN-Shapley costs: the previous full sort against the matmul distances and the truncated recursion.

    python -m benchmarks.knn_speed                       # N = 10k, 25k, 50k; U = 1,000 and 5,000; 3 repeats
    python -m benchmarks.knn_speed --n 5000 --utility 500 --repeats 1 --no-fashion-mnist   # a quick look

Speed, on synthetic embeddings of the paper CNN's size (the input of its last ``nn.Linear``): ten Gaussian
classes through a ReLU, 20 % of the training labels flipped, utility points with clean labels. For each N and U,
in one process and one thread (``--threads``): the previous implementation (``torch.cdist`` without matmul, then
a stable ``argsort`` of every row of N), :func:`knn_shapley_values` exact (matmul distances, full sort) and
truncated at ``truncation_for(--tolerance, N, K)``; the median of ``--repeats``. The yardstick is one forward
pass of the paper CNN over N images (no gradients, batch 256), timed on ``--forward-images`` and scaled to N.

Ranking, on real embeddings (``--fashion-mnist``, the default): the paper CNN after one epoch on the 50,000
Fashion-MNIST training images with pair noise, valued against the callback's utilities (F_q, and F_q ∪ R_q) of
its validation failures; the exact values against the truncated ones at each of ``--tolerances``.

Writes ``benchmarks/results/knn_speed.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.backends import train_epoch
from benchmarks.environment import environment
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.identify.knn_shapley import (DEFAULTS, embeddings, knn_shapley_values,
                                                   truncation_error_bound, truncation_for)
from lightning_repair.models import paper_cnn

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 10
K = 5


def median_seconds(work: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    """The median wall time of ``repeats`` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def previous_values(train: Tensor, train_labels: Tensor, utility: Tensor, utility_labels: Tensor,
                    batch_size: int = 256) -> Tensor:
    """The implementation the matmul and truncated version replaced, kept here as the baseline to time."""
    n = train.shape[0]
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    weights = torch.clamp(rank, max=K) / (K * rank)
    totals = torch.zeros(n, dtype=torch.float64)
    for start in range(0, utility.shape[0], batch_size):
        distances = torch.cdist(utility[start:start + batch_size], train, compute_mode="donot_use_mm_for_euclid_dist")
        order = torch.argsort(distances, dim=1, stable=True)
        match = (train_labels[order] == utility_labels[start:start + batch_size, None]).to(torch.float64)
        increments = torch.empty_like(match)
        increments[:, :-1] = (match[:, :-1] - match[:, 1:]) * weights[:-1]
        increments[:, -1] = match[:, -1] / max(n, K)
        values = increments.flip(1).cumsum(1).flip(1)
        totals += torch.zeros_like(values).scatter_(1, order, values).sum(0)
    return totals / utility.shape[0]


def synthetic(n: int, u: int, dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and utility embeddings of ten ReLU'd Gaussian classes; 20 % of the training labels flipped."""
    centres = 2 * torch.randn(CLASSES, dim, generator=generator)
    train_labels, utility_labels = (torch.randint(0, CLASSES, (m,), generator=generator) for m in (n, u))
    train = (centres[train_labels] + torch.randn(n, dim, generator=generator)).relu()
    utility = (centres[utility_labels] + torch.randn(u, dim, generator=generator)).relu()
    flip = torch.rand(n, generator=generator) < 0.2
    shift = torch.randint(1, CLASSES, (n,), generator=generator)
    return train, torch.where(flip, (train_labels + shift) % CLASSES, train_labels), utility, utility_labels


@torch.no_grad()
def forward_seconds_per_image(images: int, repeats: int) -> float:
    """One no-gradient pass of the paper CNN over ``images`` random 28×28 images, batch 256, per image."""
    model = paper_cnn().eval()
    data = torch.randn(images, 1, 28, 28)
    seconds, _ = median_seconds(lambda: torch.cat([model(batch) for batch in data.split(256)]), repeats)
    return seconds / images


def speed_rows(args: argparse.Namespace) -> list[list[str]]:
    dim = next(m for m in reversed(paper_cnn()) if isinstance(m, nn.Linear)).in_features
    per_image = forward_seconds_per_image(args.forward_images, args.repeats)
    rows = []
    for n in args.n:
        for u in args.utility:
            problem = synthetic(n, u, dim, torch.Generator().manual_seed(0))
            t = truncation_for(args.tolerance, n, K)
            previous, old = median_seconds(lambda: previous_values(*problem), args.repeats)
            exact_time, exact = median_seconds(lambda: knn_shapley_values(*problem, k=K), args.repeats)
            truncated_time, truncated = median_seconds(lambda: knn_shapley_values(*problem, k=K, truncation=t),
                                                       args.repeats)
            forward = per_image * n
            rows.append([f"{n:,}", f"{u:,}", f"{forward:.1f} s", f"{previous:.2f} s", f"{exact_time:.2f} s",
                         f"{t:,}" if t is not None else "N (exact)", f"{truncated_time:.2f} s",
                         f"{previous / truncated_time:.0f}×", f"{truncated_time / forward:.2f}",
                         f"{(exact - old).abs().max():.1e}", f"{(truncated - exact).abs().max():.1e}",
                         f"{truncation_error_bound(t, n):.1e}", f"{exact.abs().mean():.1e}",
                         f"{int(((exact < 0) != (truncated < 0)).sum())} of {int((exact < 0).sum()):,}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def top_overlap(exact: Tensor, truncated: Tensor, m: int) -> float:
    """The share of the ``m`` most negative exact values among the ``m`` most negative truncated ones."""
    return len(set(exact.argsort()[:m].tolist()) & set(truncated.argsort()[:m].tolist())) / m


def fashion_mnist_rows(args: argparse.Namespace) -> tuple[list[list[str]], str]:
    """Exact against truncated values on the paper CNN's embeddings after one epoch, for both utilities."""
    torch.manual_seed(0)
    data = FashionMNISTDataModule(noise="pairs", seed=0)
    data.setup("fit")
    model = paper_cnn()
    train_epoch(model, DataLoader(data.train_dataset, batch_size=64, shuffle=True))
    start = time.perf_counter()
    train_x, train_y = embeddings(model, DataLoader(data.train_dataset, batch_size=256))
    forward = time.perf_counter() - start
    val_x, val_y = embeddings(model, DataLoader(data.val_dataset, batch_size=256))
    with torch.no_grad():
        correct = model[-1](val_x).argmax(1) == val_y
    # The callback's split: F_q a random half of the failures F, R_q a random half of the rest R.
    generator = torch.Generator().manual_seed(0)
    halves = [part[torch.randperm(len(part), generator=generator)[: len(part) // 2]]
              for part in (torch.nonzero(~correct).flatten(), torch.nonzero(correct).flatten())]
    flipped = torch.zeros(len(train_y), dtype=torch.bool)
    flipped[data.flipped_indices] = True
    n = len(train_y)
    rows = []
    for name, utility in (("F_q ∪ R_q", torch.cat(halves)), ("F_q", halves[0])):
        problem = (train_x, train_y, val_x[utility], val_y[utility])
        exact_time, exact = median_seconds(lambda: knn_shapley_values(*problem, k=K), 1)
        causes = exact < 0
        rows.append([name, f"{len(utility):,}", "exact", f"{exact_time:.1f} s", "—", "—", "—", "—",
                     f"{int(causes.sum()):,}", f"{flipped[causes].float().mean():.3f}"])
        for tolerance in args.tolerances:
            t = truncation_for(tolerance, n, K)
            seconds, truncated = median_seconds(lambda: knn_shapley_values(*problem, k=K, truncation=t), 1)
            overlap = "/".join(f"{top_overlap(exact, truncated, m):.3f}" for m in (100, 1000, 5000))
            changed = causes != (truncated < 0)
            rows.append([name, f"{len(utility):,}", f"{tolerance:g} (T = {t:,})", f"{seconds:.1f} s",
                         f"{(truncated - exact).abs().max():.1e} ≤ {truncation_error_bound(t, n):.1e}", overlap,
                         f"{int(changed.sum()):,}", f"{exact[changed].abs().max():.1e}",
                         f"{int((truncated < 0).sum()):,}", f"{flipped[truncated < 0].float().mean():.3f}"])
            print(" | ".join(rows[-1]), flush=True)
    note = (f"One forward pass over the {n:,} training images (the embedding pass) took {forward:.1f} s; validation "
            f"accuracy {correct.float().mean():.3f}, {int(flipped.sum()):,} training labels flipped. Value scale: the "
            f"1,000th most negative exact value is {exact.sort().values[999]:.1e} (F_q), the mean |value| "
            f"{exact.abs().mean():.1e}.")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 25_000, 50_000])
    parser.add_argument("--utility", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--tolerance", type=float, default=DEFAULTS.tolerance, help="for the speed table")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 3e-4, DEFAULTS.tolerance],
                        help="for the Fashion-MNIST ranking table")
    parser.add_argument("--fashion-mnist", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--forward-images", type=int, default=10_000)
    parser.add_argument("--note", default="", help="a sentence about the machine's load, added to the results")
    parser.add_argument("--output", type=Path, default=RESULTS / "knn_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = environment()
    made_by = " ".join(["python -m benchmarks.knn_speed", "--n", *map(str, args.n), "--utility",
                        *map(str, args.utility), f"--tolerance {args.tolerance:g}", "--tolerances",
                        *(f"{t:g}" for t in args.tolerances), f"--repeats {args.repeats}", f"--threads {args.threads}",
                        "" if args.fashion_mnist else "--no-fashion-mnist"]).rstrip()
    lines = [
        "# KNN-Shapley: previous full sort, matmul exact, truncated",
        f"Made by `{made_by}`, all in one process with `torch.set_num_threads({args.threads})`. Machine: "
        f"{machine.get('cpu', '?')}, torch {torch.__version__}, revision {(machine.get('git_commit') or '?')[:7]}. "
        f"{args.note}".rstrip(),
        "## Speed",
        f"Synthetic embeddings of the paper CNN's size: ten ReLU'd Gaussian classes, 20 % of the training labels "
        f"flipped, K = {K}; the median of {args.repeats}. *forward pass*: one no-gradient pass of the paper CNN over "
        f"N images (batch 256), timed on {args.forward_images:,} and scaled to N. *previous*: `torch.cdist` without "
        "matmul and a stable `argsort` of every row (the code before this version). *T*: "
        f"`truncation_for({args.tolerance:g}, N, K)`. *sign changes*: examples whose value is < 0 on one side and "
        "not the other, of those < 0 exactly (the callback's default cause set).",
    ]
    header = ["N", "U", "forward pass", "previous", "exact (matmul)", "T", "truncated", "speed-up",
              "truncated ÷ forward", "max \\|exact − previous\\|", "max \\|truncated − exact\\|",
              "bound 1/T − 1/N", "mean \\|value\\|", "sign changes"]
    lines += ["| " + " | ".join(header) + " |\n|" + "---|" * len(header)]
    lines[-1] += "".join("\n| " + " | ".join(row) + " |" for row in speed_rows(args))
    if args.fashion_mnist:
        rows, note = fashion_mnist_rows(args)
        lines += ["## Ranking on real embeddings",
                  "The paper CNN after one epoch (Adam, batch 64) on Fashion-MNIST's 50,000 training images with "
                  f"pair noise, K = {K}, one run each. {note} *top-m overlap*: the share of the m most negative exact "
                  "values among the m most negative truncated ones. *sign changes*: as above, with the largest "
                  "|exact value| among them. *value < 0*: the callback's default cause set, and its precision "
                  "against the flipped labels."]
        header = ["utility", "U", "tolerance", "time", "max \\|truncated − exact\\| ≤ bound",
                  "top-100/1000/5000 overlap", "sign changes", "largest \\|exact\\| changed", "value < 0",
                  "precision"]
        lines += ["| " + " | ".join(header) + " |\n|" + "---|" * len(header)
                  + "".join("\n| " + " | ".join(row) + " |" for row in rows)]
    args.output.write_text("\n\n".join(lines) + "\n")
    print(args.output.read_text())


if __name__ == "__main__":
    main()
