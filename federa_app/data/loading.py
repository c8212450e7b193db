"""Labelled text datasets: loading, a seeded train/test split, client partitions and batches.

Every dataset comes out as a `datasets.Dataset` with `text`, `label` (a ClassLabel, ids 0..K-1),
an optional `text_pair` and any metadata columns. Partitions come from flwr-datasets'
partitioners, seeded, so every node and process derives the same client data on its own.

`datasets` (and with it pyarrow and pandas: ~130 MB of memory and ~0.8 s of import) is imported
only where a dataset is read, split or partitioned. A ClientApp whose node has its prepared rows
in the node cache trains on plain lists (`Rows`) and never loads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from federa_app.config import Partitioning, RunConfig, partition_advice
from federa_app.data.assets import DATASET_ASSETS, asset_path, federa_home
from federa_app.errors import AssetError, ConfigError, DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

DATASET_CHOICES: tuple[str, ...] = (*DATASET_ASSETS, "csv:PATH", "json:PATH", "hf:NAME[:CONFIG]")


@functools.cache
def _datasets() -> ModuleType:
    """The `datasets` module, imported on first use (see the module docstring)."""
    import datasets

    datasets.disable_progress_bars()  # tiny in-memory maps; bars would drown per-round progress
    return datasets


# ---------------------------------------------------------------------------------------------
# Loading


def validate_dataset_name(name: str) -> None:
    """Check a dataset spec's syntax (and that a csv/json file exists) without loading it."""
    kind, _, arg = name.partition(":")
    if name in DATASET_ASSETS or (kind == "hf" and arg.partition(":")[0]):
        return
    if kind in ("csv", "json") and arg:
        if not Path(arg).is_file():
            raise ConfigError(f"dataset '{name}': no such file {arg}")
        return
    raise ConfigError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_CHOICES)}")


def load_labelled(name: str) -> tuple[Dataset, list[str]]:
    """Load a dataset spec as (rows with text/label[/text_pair], label names by id); cached."""
    ds, label_names = _load_labelled_cached(name)
    return ds, list(label_names)


@functools.lru_cache(maxsize=8)
def _load_labelled_cached(name: str) -> tuple[Dataset, tuple[str, ...]]:
    """Read, clean and label-encode a dataset once per process (clients ask for it every round)."""
    validate_dataset_name(name)
    kind, _, arg = name.partition(":")
    if name == "rotten-tomatoes":
        ds = _rotten_tomatoes()
    elif name == "trec6":
        ds = _trec6()
    elif name == "sms-spam":
        ds = _sms_spam()
    elif kind in ("csv", "json"):
        ds = _read_file(kind, arg)
    else:
        ds = _read_hub(*arg.split(":", 1))
    return _encode(ds, source=name)


def _rotten_tomatoes() -> Dataset:
    """Critic snippets labelled fresh/rotten; the file also holds plot summaries and repeats."""
    import pandas as pd

    frame = pd.read_csv(asset_path("rotten-tomatoes"))
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.rename(columns={"category": "label"})[["text", "label", "movie_name"]]
    return _datasets().Dataset.from_pandas(frame, preserve_index=False)


def _trec6() -> Dataset:
    """TREC questions with their 6 coarse labels (the fine `COARSE:fine` label kept as metadata)."""
    lines = asset_path("trec6").read_text(encoding="latin-1").splitlines()
    # The file repeats nested 1k..5.5k training sets: keep each line once, in file order.
    lines = list(dict.fromkeys(line for line in lines if line.strip()))
    fine_labels, texts = zip(*(line.split(" ", 1) for line in lines), strict=True)
    coarse = [fine.split(":", 1)[0] for fine in fine_labels]
    return _datasets().Dataset.from_dict(
        {"text": texts, "label": coarse, "fine_label": fine_labels}
    )


def _sms_spam() -> Dataset:
    """SMS messages labelled ham/spam, with the rows a plain CSV read swallows split back out."""
    import pandas as pd

    frame = pd.read_csv(asset_path("sms-spam"))
    frame["label"] = frame["spam"].map({0: "ham", 1: "spam"})
    # A few cells hold raw "\nham\t..." / "\nspam\t..." lines of the source TSV: one row each.
    pieces = frame["text"].str.split(r"\n(?=(?:ham|spam)\t)", regex=True)
    frame = frame.assign(text=pieces).explode("text", ignore_index=True)
    swallowed = frame["text"].str.extract(r"^(ham|spam)\t(.*)$", flags=re.DOTALL)
    frame["label"] = swallowed[0].fillna(frame["label"])
    frame["text"] = swallowed[1].fillna(frame["text"])
    return _datasets().Dataset.from_pandas(frame[["text", "label"]], preserve_index=False)


def _read_file(kind: str, path: str) -> Dataset:
    """A local CSV or JSON(-lines) file, read by `datasets`' packaged loaders."""
    try:
        # In memory: splits and partitions then never try to write index files next to the cache.
        return _datasets().load_dataset(kind, data_files=path, split="train", keep_in_memory=True)
    except Exception as error:  # pyarrow/pandas parse errors have no common base class
        cause = error
        while cause.__cause__ is not None:  # DatasetGenerationError wraps the parser's error
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [""])[0]
        raise DataError(f"could not read {kind} file {path}: {reason}") from error


def _read_hub(hub_name: str, config: str | None = None) -> Dataset:
    """The `train` split of a Hugging Face hub dataset (re-split later into train/test)."""
    try:
        return _datasets().load_dataset(hub_name, config, split="train", keep_in_memory=True)
    except OSError as error:  # ConnectionError when offline, FileNotFoundError when unknown
        raise AssetError(
            f"hub dataset '{hub_name}' could not be loaded ({type(error).__name__}); offline only "
            f"{', '.join(DATASET_ASSETS)}, csv:PATH and json:PATH work"
        ) from error
    except ValueError as error:  # unknown config name or no train split
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"hub dataset '{hub_name}' config '{config}': {reason}") from error


def _encode(ds: Dataset, source: str) -> tuple[Dataset, tuple[str, ...]]:
    """Check the columns, drop unlabelled rows and make `label` a ClassLabel with sorted names."""
    ClassLabel, Value = _datasets().ClassLabel, _datasets().Value  # noqa: N806 - class names
    strings = (Value("string"), Value("large_string"))
    missing = [column for column in ("text", "label") if column not in ds.column_names]
    if missing:
        raise DataError(
            f"dataset '{source}' has no '{missing[0]}' column (columns found: "
            f"{', '.join(ds.column_names)}); rename the columns to text, label[, text_pair]"
        )
    ds = ds.filter(lambda row: row["text"] is not None and row["label"] is not None)
    if len(ds) == 0:
        raise DataError(f"dataset '{source}' has no labelled rows")
    for column in ("text", "text_pair"):
        if column in ds.column_names and ds.features[column] not in strings:
            ds = ds.cast_column(column, Value("string"))

    label = ds.features["label"]
    if isinstance(label, ClassLabel):  # a hub dataset's own label order is kept
        ds = ds.filter(lambda row: row["label"] >= 0)  # -1 marks hidden labels (GLUE test sets)
        return ds, tuple(label.names)
    if not isinstance(label, Value) or label.dtype.startswith(("float", "double")):
        raise DataError(
            f"dataset '{source}' has {label} labels; give one class per row as a string or integer"
        )
    if label.dtype.startswith(("int", "uint")):
        # class_encode_column would sort integers as strings ("10" < "2"): sort them as numbers
        values = sorted(ds.unique("label"))
        index = {value: i for i, value in enumerate(values)}
        ds = ds.map(lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True)
        ds = ds.cast_column("label", ClassLabel(names=[str(v) for v in values]))
    else:
        ds = ds.class_encode_column("label")
    return ds, tuple(ds.features["label"].names)


# ---------------------------------------------------------------------------------------------
# Splitting and partitioning


# In-process memo keyed by dataset fingerprint: a client process is asked for its data every round.
_MEMO: dict[tuple, object] = {}
_MEMO_SIZE = 32


def _memo_put(key: tuple, value: object) -> None:
    """Remember a value, forgetting the oldest entry beyond _MEMO_SIZE."""
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = value


def split_train_test(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded train/test split, stratified by label where every class has enough rows; memoized."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test fraction {test_fraction} must be strictly between 0 and 1")
    key = ("split", ds._fingerprint, test_fraction, seed)
    if key not in _MEMO:
        try:
            parts = ds.train_test_split(
                test_size=test_fraction, seed=seed, stratify_by_column="label", keep_in_memory=True
            )
        except ValueError:  # a class with a single row, or label not a ClassLabel: plain split
            parts = ds.train_test_split(test_size=test_fraction, seed=seed, keep_in_memory=True)
        _memo_put(key, (parts["train"], parts["test"]))
    return _MEMO[key]


def load_task(
    name: str, test_fraction: float, seed: int
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """The seeded (train, test) split of a dataset spec and its label names."""
    dataset, labels = load_labelled(name)
    train, test = split_train_test(dataset, test_fraction, seed)
    return train, test, tuple(labels)


def _partitions(train: Dataset, how: Partitioning) -> list[Dataset]:
    """All partitions of `train`, computed once per process and memoized."""
    key = ("partitions", train._fingerprint, how)
    if key in _MEMO:
        return _MEMO[key]
    # Imported here: flwr-datasets pulls in its plotting stack (seaborn, scipy: ~0.7 s), which a
    # node whose prepared rows are cached on disk never needs.
    from federa_app.data.partitioning import compute_partitions

    partitions = compute_partitions(train, how)
    _memo_put(key, partitions)
    return partitions


def _check_not_empty(sizes: list[int], partition_ids: list[int], spec: str) -> None:
    """Raise DataError naming the first of `partition_ids` that holds no rows.

    The partitioners configured above never leave a client empty; this guards the contract the
    server relies on should a partitioner's behaviour change.
    """
    for partition_id in partition_ids:
        if sizes[partition_id] == 0:
            raise DataError(
                f"partition {partition_id} of {len(sizes)} is empty (partitioner '{spec}', "
                f"{sum(sizes)} training rows); {partition_advice(spec)}"
            )


def partition_sizes(train: Dataset, how: Partitioning) -> list[int]:
    """Rows per partition, so the server can refuse a run with an empty client before training."""
    sizes = [len(partition) for partition in _partitions(train, how)]
    _check_not_empty(sizes, list(range(how.num_partitions)), how.spec)
    return sizes


def client_partition(train: Dataset, how: Partitioning, partition_id: int) -> Dataset:
    """One client's rows of the training split; identical on every node for the same seed."""
    if not 0 <= partition_id < how.num_partitions:
        raise ConfigError(f"partition id {partition_id} is not in 0..{how.num_partitions - 1}")
    partitions = _partitions(train, how)
    _check_not_empty([len(partition) for partition in partitions], [partition_id], how.spec)
    return partitions[partition_id]


# ---------------------------------------------------------------------------------------------
# A node's training data

# Train-config key under which the server sends its label names (ids are indices into the list).
LABELS_KEY = "labels"
NODE_DATA_CHOICES: tuple[str, ...] = ("csv:PATH", "json:PATH", *DATASET_ASSETS, "hf:NAME[:CONFIG]")


def node_train_data(
    node_config: Mapping[str, Any], cfg: RunConfig, labels: Sequence[str]
) -> Dataset:
    """This node's training rows, label ids re-numbered by name into the server's `labels`.

    Node-config `data` picks them: `csv:PATH`/`json:PATH` is the node's own whole file; another
    dataset spec is partition `partition-id` of `num-partitions` of that dataset's train split.
    Without `data`, the node takes its partition of the run's dataset (as in simulation).
    """
    spec = node_config.get("data")
    if spec is None:
        where = f"run-config dataset={cfg.dataset!r} (no node-config data)"
        rows, names = _node_partition(node_config, cfg, cfg.dataset, where)
        return to_server_labels(rows, names, labels, cfg.dataset)
    where = f"node-config data={spec!r}"
    kind, _, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind in ("csv", "json") and path:
        if not Path(path).is_file():
            raise ConfigError(f"{where}: no such file {path}")
        rows, names = load_labelled(spec)
    elif spec in DATASET_ASSETS or (kind == "hf" and path.partition(":")[0]):
        rows, names = _node_partition(node_config, cfg, spec, where)
    else:
        raise ConfigError(
            f"{where} is not a dataset; choose one of: {', '.join(NODE_DATA_CHOICES)}"
        )
    return to_server_labels(rows, names, labels, spec)


NODE_CACHE_ENV = "FEDERA_NODE_CACHE"  # where nodes keep their prepared rows; "off" disables


def node_cache_dir() -> Path | None:
    """$FEDERA_NODE_CACHE, else $FEDERA_HOME/node-data; None when set to "off"."""
    value = os.environ.get(NODE_CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else federa_home() / "node-data"


def _source_stamp(spec: str) -> list:
    """What identifies a dataset spec's content: a file's path, size and mtime; else the name."""
    kind, _, path = spec.partition(":")
    if kind in ("csv", "json") and path:
        file = Path(path)
    elif spec in DATASET_ASSETS:
        file = asset_path(spec)
    else:
        return [spec]
    stat = file.stat()
    return [spec, str(file.resolve()), stat.st_size, stat.st_mtime_ns]


@dataclass(frozen=True)
class Rows:
    """A node's prepared training rows as plain lists: all that training needs, no `datasets`.

    Columns `text`, `label` (ids into `label_names`, the server's labels) and, for sentence-pair
    tasks, `text_pair`; `rows["text"]`, `rows.column_names` and `len(rows)` read like a Dataset's.
    """

    columns: dict[str, list]
    label_names: tuple[str, ...]

    COLUMNS = ("text", "text_pair", "label")  # what make_loader reads; metadata columns drop

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Rows:
        """The training columns of a labelled Dataset (label a ClassLabel) as lists."""
        columns = {name: list(ds[name]) for name in cls.COLUMNS if name in ds.column_names}
        return cls(columns, tuple(ds.features["label"].names))

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def __getitem__(self, column: str) -> list:
        return self.columns[column]

    def __len__(self) -> int:
        return len(self.columns["label"])

    def to_dict(self) -> dict[str, list]:
        return dict(self.columns)


def cached_node_train_data(
    node_config: Mapping[str, Any], cfg: RunConfig, labels: Sequence[str]
) -> Rows:
    """`node_train_data`'s training columns, kept on the node's disk between messages.

    Flower 1.42 starts a fresh ClientApp process for every message, so in-memory caches never
    survive a round; re-reading, encoding and partitioning costs ~2 s per message on a 2-core
    machine. The prepared rows are kept as a JSON file of plain lists: reading it takes a few
    ms and needs no `datasets` (whose import alone costs ~0.8 s and ~130 MB). The key covers
    every input of the rows: node config, file size/mtime, split and partition settings.
    """
    cache = node_cache_dir()
    if cache is None:
        return Rows.from_dataset(node_train_data(node_config, cfg, labels))
    spec = node_config.get("data") or cfg.dataset
    settings = [cfg.test_fraction, cfg.seed, cfg.partitioner, cfg.dirichlet_alpha]
    settings.append(cfg.classes_per_client)
    key_source = [sorted(node_config.items()), _source_stamp(str(spec)), settings, list(labels)]
    key = hashlib.sha256(json.dumps(key_source, default=str).encode()).hexdigest()[:20]
    path = cache / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return Rows(saved["columns"], tuple(saved["label_names"]))
    rows = Rows.from_dataset(node_train_data(node_config, cfg, labels))
    partial = cache / f"{key}.partial-{os.getpid()}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        saved = {"columns": rows.columns, "label_names": list(rows.label_names)}
        partial.write_text(json.dumps(saved), encoding="utf-8")
        partial.replace(path)  # atomic: a reader sees the whole file or none
    except OSError:  # a read-only disk: the rows are prepared again next time
        partial.unlink(missing_ok=True)
    return rows


def node_partition_id(node_config: Mapping[str, Any]) -> int:
    """The node-config `partition-id` as an int, or -1 when the node has none (its own data)."""
    return _node_int(node_config, "partition-id") if "partition-id" in node_config else -1


def _node_int(node_config: Mapping[str, Any], key: str) -> int:
    """A node-config integer (TOML gives ints; a quoted "3" is accepted too); else ConfigError."""
    value = node_config[key]
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"node-config {key}={value!r} must be an integer")
    return value


def _node_partition(
    node_config: Mapping[str, Any], cfg: RunConfig, name: str, where: str
) -> tuple[Dataset, list[str]]:
    """Partition `partition-id` of `num-partitions` of a dataset's train split, with its names."""
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise ConfigError(
            f"{where} needs node-config {' and '.join(missing)} (e.g. --node-config "
            f'"partition-id=0 num-partitions=2"), or data="csv:PATH" for a node\'s own file'
        )
    partition_id = _node_int(node_config, "partition-id")
    num_partitions = _node_int(node_config, "num-partitions")
    train, _, names = load_task(name, cfg.test_fraction, cfg.seed)
    rows = client_partition(train, Partitioning.of(cfg, num_partitions), partition_id)
    return rows, list(names)


def to_server_labels(
    ds: Dataset, names: Sequence[str], labels: Sequence[str], source: str
) -> Dataset:
    """Re-number label ids from indices into `names` to indices into `labels`, matching by name.

    Names are compared as strings, so integer labels ("2" < "10", sorted as numbers) and the same
    integers written as strings ("10" < "2") both land on the server's ids.
    """
    if list(names) == list(labels):
        return ds
    server_id = {name: i for i, name in enumerate(labels)}
    present = [names[i] for i in sorted(set(ds["label"]))]
    unknown = [name for name in present if name not in server_id]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(
            f"data '{source}' has label(s) {shown}{more} that the server does not know; "
            f"the server's labels are: {', '.join(labels)}"
        )
    new_id = [server_id.get(name, -1) for name in names]  # -1: a name no row uses
    features = ds.features.copy()
    features["label"] = _datasets().ClassLabel(names=list(labels))
    return ds.map(
        lambda batch: {"label": [new_id[i] for i in batch["label"]]},
        batched=True,
        features=features,
        keep_in_memory=True,
    )


# ---------------------------------------------------------------------------------------------
# Batches


def make_loader(
    ds: Dataset | Rows,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_length: int,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """Batches of input_ids/attention_mask[/token_type_ids]/labels, padded per batch (dynamic).

    `ds` is a Dataset or `Rows` (anything with `text`, `label`[, `text_pair`] columns). Each
    batch is tokenized when it is drawn, so only the rows a round trains on are tokenized; with
    `shuffle` the order is a permutation of the row indices seeded by `seed`.
    """
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
    labels = list(ds["label"])

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [texts[i] for i in indices],
            [pairs[i] for i in indices] if pairs is not None else None,
            truncation=True,
            max_length=max_length,
            padding=True,  # to the longest row of this batch
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([labels[i] for i in indices], dtype=torch.long)
        return batch

    return DataLoader(
        range(len(labels)),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
