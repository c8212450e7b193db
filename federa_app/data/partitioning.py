"""Partitioning a training split among clients with flwr-datasets' partitioners.

Kept apart from loading.py so that importing flwr-datasets (and the plotting stack it imports,
~0.7 s) happens only where a partition is computed, not in every ClientApp process.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from federa_app.config import PARTITIONER_CHOICES, Partitioning, partition_advice
from federa_app.errors import ConfigError, DataError


class ColumnGroupPartitioner(Partitioner):
    """Each of exactly `num_partitions` clients holds whole groups of one column's values.

    Hand-written because flwr-datasets' NaturalIdPartitioner makes one partition per value and
    GroupedNaturalIdPartitioner a fixed number of values per partition, so neither can be
    asked for exactly N partitions.
    """

    def __init__(self, partition_by: str, num_partitions: int, seed: int) -> None:
        super().__init__()
        self._partition_by = partition_by
        self._num_partitions = num_partitions
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        """Rows whose column value was dealt to this partition (values dealt once, seeded)."""
        if self._indices is None:
            column = self.dataset.select_columns(self._partition_by).to_pandas()[self._partition_by]
            codes, values = pd.factorize(column, sort=True, use_na_sentinel=False)  # None: a value
            if len(values) < self._num_partitions:
                raise ValueError(
                    f"column '{self._partition_by}' has only {len(values)} distinct values"
                )
            shuffled = np.random.default_rng(self._seed).permutation(len(values))
            partition_of_value = np.empty(len(values), dtype=int)
            for partition, chunk in enumerate(np.array_split(shuffled, self._num_partitions)):
                partition_of_value[chunk] = partition
            partition_of_row = partition_of_value[codes]
            self._indices = [
                np.flatnonzero(partition_of_row == p) for p in range(self._num_partitions)
            ]
        return self.dataset.select(self._indices[partition_id])


def make_partitioner(how: Partitioning) -> Partitioner:
    """A fresh flwr-datasets partitioner for a spec in PARTITIONER_CHOICES, not yet given data."""
    spec, num_partitions, seed = how.spec, how.num_partitions, how.seed
    dirichlet_alpha, classes_per_client = how.dirichlet_alpha, how.classes_per_client
    if num_partitions < 1:
        raise ConfigError(f"number of partitions {num_partitions} must be at least 1")
    if spec == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if spec == "dirichlet":
        if not dirichlet_alpha > 0:
            raise ConfigError(f"dirichlet-alpha {dirichlet_alpha} must be greater than 0")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(dirichlet_alpha),
            min_partition_size=1,  # redraw (seeded, at most 10 times) while a client gets nothing
            seed=seed,
        )
    if spec == "pathological":
        if classes_per_client < 1:
            raise ConfigError(f"classes-per-client {classes_per_client} must be at least 1")
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",  # every class used when N >= K
            seed=seed,
        )
    if spec.startswith("column:") and spec.removeprefix("column:"):
        return ColumnGroupPartitioner(spec.removeprefix("column:"), num_partitions, seed)
    raise ConfigError(
        f"unknown partitioner '{spec}'; choose one of: {', '.join(PARTITIONER_CHOICES)}"
    )


def compute_partitions(train: Dataset, how: Partitioning) -> list[Dataset]:
    """All partitions of `train` (loading.py memoizes them per process)."""
    spec, num_partitions = how.spec, how.num_partitions
    column = spec.removeprefix("column:") if spec.startswith("column:") else "label"
    partitioner = make_partitioner(how)
    if column not in train.column_names:
        raise DataError(
            f"partitioner '{spec}': no column '{column}' in the training data "
            f"(columns: {', '.join(train.column_names)})"
        )
    cannot_split = f"cannot split {len(train)} training rows into {num_partitions} partitions"
    if len(train) < num_partitions:
        raise DataError(f"partitioner '{spec}' {cannot_split}; use fewer clients")
    # IidPartitioner takes contiguous shards, so rows are shuffled (seeded) for every partitioner.
    partitioner.dataset = train.shuffle(seed=how.seed, keep_in_memory=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr warns per Dirichlet redraw; we raise if all fail
            partitions = [partitioner.load_partition(p) for p in range(num_partitions)]
    except ValueError as error:
        raise DataError(
            f"partitioner '{spec}' {cannot_split} ({error}); {partition_advice(spec)}"
        ) from error
    return partitions
