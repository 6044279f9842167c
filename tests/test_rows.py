"""Per-batch results of a pass are written into one buffer, equal to concatenating them."""

from __future__ import annotations

import torch

from lightning_repair.examples import Rows


def test_rows_equal_the_concatenated_batches_in_order_and_dtype():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(size, 3, generator=generator) for size in (4, 4, 2)]
    labels = [torch.randint(0, 5, (len(part),), generator=generator) for part in parts]
    features, classes = Rows(10), Rows(10)
    for part, label in zip(parts, labels):
        features.append(part)
        classes.append(label)
    assert torch.equal(features.tensor(torch.empty(0, 3)), torch.cat(parts))
    assert torch.equal(classes.tensor(torch.empty(0, dtype=torch.long)), torch.cat(labels))
    assert classes.tensor(torch.empty(0)).dtype == torch.long


def test_rows_grow_when_a_loader_yields_more_than_its_dataset_size():
    parts = [torch.arange(start, start + 3) for start in range(0, 12, 3)]
    rows = Rows(5)
    for part in parts:
        rows.append(part)
    assert torch.equal(rows.tensor(torch.empty(0)), torch.arange(12))


def test_rows_that_saw_fewer_batches_hold_only_what_was_written():
    rows = Rows(100)
    rows.append(torch.ones(7))
    assert rows.tensor(torch.empty(0)).shape == (7,)


def test_rows_of_a_pass_without_batches_are_the_given_empty_tensor():
    empty = torch.empty(0, dtype=torch.long)
    assert Rows(0).tensor(empty) is empty


def test_rows_of_a_loader_are_sized_by_its_dataset_and_of_any_iterable_by_its_batches():
    from torch.utils.data import DataLoader, TensorDataset

    assert Rows.of(DataLoader(TensorDataset(torch.zeros(10, 2)), batch_size=4)).rows == 10
    batches = [torch.ones(3), torch.ones(3), torch.ones(1)]  # a list of batches has no dataset
    rows = Rows.of(batches)
    for batch in batches:
        rows.append(batch)
    assert rows.rows == 0 and torch.equal(rows.tensor(torch.empty(0)), torch.ones(7))
