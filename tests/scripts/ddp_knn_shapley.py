"""KNN-Shapley sharded across 2 CPU processes (gloo), and the same in one process. Used by tests/test_knn_shapley.py.

Writes ROOT/rank_<r>.pt with what each rank computed and ROOT/single.pt with the single-process results.
"""

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.adapter import BatchAdapter
from lightning_repair.distributed import SINGLE_PROCESS, Ranks
from lightning_repair.identify import KNNShapley, ScoringInputs, knn_shapley_values


def results(ranks: Ranks) -> dict:
    """Values of 101 training points against 37 utility points by the function and the scorer, on ``ranks``."""
    gen = torch.Generator().manual_seed(0)
    train_x, utility_x = (torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (101, 37))
    train_y, utility_y = (torch.randint(0, 3, (n,), generator=gen) for n in (101, 37))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    embedded: list[int] = []

    def inputs(utility: slice) -> ScoringInputs:
        def progress(loader, description):
            embedded.append(len(loader.dataset))
            return loader

        train = DataLoader(TensorDataset(train_x.float(), train_y), batch_size=16)
        query = DataLoader(TensorDataset(utility_x[utility].float(), utility_y[utility]), batch_size=8)
        return ScoringInputs(model=model, train=train, query=query, stop=None, trusted=None, fisher=None, n_train=101,
                             adapter=BatchAdapter(), progress=progress, ranks=ranks)

    return {
        "exact": knn_shapley_values(train_x, train_y, utility_x, utility_y, k=3, batch_size=5, ranks=ranks),
        "truncated": knn_shapley_values(train_x, train_y, utility_x, utility_y, k=3, batch_size=5, truncation=10,
                                        ranks=ranks),
        "scorer": KNNShapley(k=3, batch_size=5).score(inputs(slice(None))),  # truncated at T = 92 of 101
        "scorer_one_utility_point": KNNShapley(k=3, tolerance=None).score(inputs(slice(0, 1))),  # rank 1's share: none
        "embedded": embedded,
    }


def run(rank: int, world_size: int, port: int, root: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(results(Ranks(rank=rank, world_size=world_size)), root / f"rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    root = Path(sys.argv[1])
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(run, args=(2, port, root), nprocs=2, start_method="fork")  # fork: no second import of torch
    torch.save(results(SINGLE_PROCESS), root / "single.pt")
