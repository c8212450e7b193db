"""Node-local training data: node-config `data`, label ids mapped by name onto the server's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_toy_csv
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from federa_app.config import Partitioning, parse_run_config
from federa_app.data import loading
from federa_app.errors import ConfigError, DataError
from federa_app.federation import client
from federa_app.federation.client import handle_train, server_labels
from federa_app.federation.server import make_train_config
from federa_app.federation.wire import content_bytes
from federa_app.method.models import build_model, trainable_state

LABELS = ("negative", "positive")


def run_config(tiny_bert: Path, dataset: str) -> dict:
    """A cheap LoRA run on the tiny BERT: two local steps of eight rows."""
    return {
        "model": str(tiny_bert), "dataset": dataset, "method": "lora", "lora-rank": 2,
        "local-steps": 2, "batch-size": 8, "partitioner": "iid", "num-threads": 1,
    }  # fmt: skip


def train_once(
    tiny_bert: Path, config: dict, node_config: dict, labels: tuple[str, ...] | None
) -> Message:
    """One ClientApp train round trip on node 11; the server's labels sent when given."""
    cfg = parse_run_config(config)
    model = build_model(cfg, str(tiny_bert), labels or LABELS)
    train_config = make_train_config(labels) if labels else ConfigRecord({})
    train_config["server-round"] = 1
    content = RecordDict({"arrays": ArrayRecord(trainable_state(model)), "config": train_config})
    context = Context(1, 11, node_config, RecordDict(), config)
    return handle_train(Message(content, dst_node_id=11, message_type="train"), context)


def raw_labels(path: Path) -> list[str]:
    """The label column of a csv or json-lines file as written, as strings."""
    if path.suffix == ".csv":
        with path.open() as f:
            return [row["label"] for row in csv.DictReader(f)]
    return [str(json.loads(line)["label"]) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, labels: list) -> Path:
    """A json-lines file with one row per label."""
    rows = [{"text": f"the movie {i}", "label": label} for i, label in enumerate(labels)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture
def fake_sms_spam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60-row stand-in for the offline `sms-spam` asset in a fresh FEDERA_HOME."""
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "data" / "sms-spam"
    folder.mkdir(parents=True)
    lines = ["text,spam"] + [f"message number {i},{int(i % 3 == 0)}" for i in range(60)]
    (folder / "sms-spam.csv").write_text("\n".join(lines) + "\n")
    loading._load_labelled_cached.cache_clear()
    yield
    loading._load_labelled_cached.cache_clear()


def test_node_trains_on_its_whole_csv_without_the_runs_dataset(
    tmp_path, tiny_bert, server_identity
):
    node_csv = write_toy_csv(tmp_path / "node.csv", rows=37)
    # The run's dataset does not exist on this node: loading it would raise ConfigError.
    config = run_config(tiny_bert, f"csv:{tmp_path / 'only-on-the-server.csv'}")
    reply = train_once(tiny_bert, config, {"data": f"csv:{node_csv}"}, LABELS)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 37
    assert metrics["partition-id"] == -1
    sent_back = reply.content["arrays"].to_torch_state_dict()
    assert sent_back and all(".lora_" in n or "classifier" in n for n in sent_back)


def test_string_labels_map_onto_the_servers_order_by_name(tmp_path):
    path = tmp_path / "node.csv"
    path.write_text("text,label\ngood film,positive\nfine plot,neutral\nfun,positive\n")
    labels = ("negative", "neutral", "positive")
    cfg = parse_run_config({"dataset": "csv:/not/needed.csv"})
    rows = loading.node_train_data({"data": f"csv:{path}"}, cfg, labels)
    _, local_names = loading.load_labelled(f"csv:{path}")
    assert local_names == ["neutral", "positive"]  # the file alone would number them 0, 1
    assert list(rows["label"]) == [2, 1, 2]
    assert [labels[i] for i in rows["label"]] == raw_labels(path)
    assert rows.features["label"].names == list(labels)


def test_integer_labels_map_by_name_whether_written_as_ints_or_strings(tmp_path):
    server = write_jsonl(tmp_path / "server.jsonl", [10, 2, 7, 2])
    _, labels = loading.load_labelled(f"json:{server}")
    assert labels == ["2", "7", "10"]  # integers sort as numbers on the server
    cfg = parse_run_config({"dataset": f"json:{server}"})

    as_ints = tmp_path / "ints.csv"
    as_ints.write_text("text,label\na,10\nb,2\nc,10\n")
    as_strings = write_jsonl(tmp_path / "strings.jsonl", ["10", "2", "7", "10"])
    _, string_names = loading.load_labelled(f"json:{as_strings}")
    assert string_names == ["10", "2", "7"]  # strings sort as text: "10" would be id 0
    for path, spec in ((as_ints, f"csv:{as_ints}"), (as_strings, f"json:{as_strings}")):
        rows = loading.node_train_data({"data": spec}, cfg, labels)
        assert [labels[i] for i in rows["label"]] == raw_labels(path), spec
    assert list(loading.node_train_data({"data": f"json:{as_strings}"}, cfg, labels)["label"]) == [
        2, 0, 1, 2,
    ]  # fmt: skip


def test_named_dataset_partition_is_the_runs_partition(
    fake_sms_spam, tiny_bert, server_identity, tmp_path
):
    config = run_config(tiny_bert, f"csv:{tmp_path / 'only-on-the-server.csv'}")
    cfg = parse_run_config(config)
    node_config = {"data": "sms-spam", "partition-id": 1, "num-partitions": 3}
    train, _, names = loading.load_task("sms-spam", cfg.test_fraction, cfg.seed)
    expected = loading.client_partition(
        train, Partitioning("iid", 3, cfg.seed, cfg.dirichlet_alpha, 2), 1
    )

    rows = loading.node_train_data(node_config, cfg, ("ham", "spam"))
    assert names == ("ham", "spam")
    assert list(rows["text"]) == list(expected["text"]) and len(rows) == 16
    assert list(rows["label"]) == list(expected["label"])
    # A server that knows one more class: same rows, ids renumbered by name.
    wider = ("ham", "other", "spam")
    renumbered = loading.node_train_data(node_config, cfg, wider)
    assert list(renumbered["text"]) == list(expected["text"])
    assert [wider[i] for i in renumbered["label"]] == [names[i] for i in expected["label"]]

    reply = train_once(tiny_bert, config, node_config, ("ham", "spam"))
    assert reply.content["metrics"]["num-examples"] == len(expected)
    assert reply.content["metrics"]["partition-id"] == 1


def test_unknown_label_fails_in_one_line_before_training(
    tmp_path, tiny_bert, server_identity, monkeypatch
):
    path = tmp_path / "node.csv"
    path.write_text("text,label\ngood,positive\nmeh,so-so\nbad,negative\nugh,awful\n")

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained despite an unknown label")

    monkeypatch.setattr(client, "train_locally", must_not_train)
    with pytest.raises(DataError) as error:
        train_once(tiny_bert, run_config(tiny_bert, "csv:/x.csv"), {"data": f"csv:{path}"}, LABELS)
    message = str(error.value)
    assert "\n" not in message
    assert "'awful', 'so-so'" in message and "server's labels are: negative, positive" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("node_config", "pattern"),
    [
        ({"data": "csv:/no/such.csv"}, r"data='csv:/no/such.csv': no such file /no/such.csv"),
        ({"data": "imdb"}, r"'imdb' is not a dataset; .*csv:PATH, json:PATH, rotten-tomatoes"),
        ({"data": "tsv:/x.tsv"}, r"'tsv:/x.tsv' is not a dataset; .*sms-spam, hf:NAME"),
        ({"data": "csv:"}, r"'csv:' is not a dataset"),
        ({"data": 3}, r"data=3 is not a dataset"),
        ({"data": "trec6"}, r"'trec6' needs node-config partition-id and num-partitions"),
        ({"data": "trec6", "partition-id": 0}, r"'trec6' needs node-config num-partitions\b"),
        ({}, r"dataset='csv:/x.csv' \(no node-config data\) needs node-config partition-id"),
        ({"partition-id": "one", "num-partitions": 2}, r"partition-id='one' must be an integer"),
    ],
)
def test_bad_node_config_names_the_value_and_the_choices(node_config, pattern):
    cfg = parse_run_config({"dataset": "csv:/x.csv"})
    with pytest.raises(ConfigError, match=pattern) as error:
        loading.node_train_data(node_config, cfg, LABELS)  # nothing is loaded before these checks
    assert "\n" not in str(error.value)


def test_without_data_the_node_keeps_its_partition_of_the_runs_dataset(
    tmp_path, tiny_bert, server_identity
):
    toy = write_toy_csv(tmp_path / "toy.csv", rows=60)
    config = run_config(tiny_bert, f"csv:{toy}")
    cfg = parse_run_config(config)
    node_config = {"partition-id": 1, "num-partitions": 2}
    train, _, labels = loading.load_task(cfg.dataset, cfg.test_fraction, cfg.seed)
    expected = loading.client_partition(
        train, Partitioning("iid", 2, cfg.seed, cfg.dirichlet_alpha, 2), 1
    )
    for sent in (labels, None):  # the server's label list, or none (an older server)
        rows = loading.node_train_data(node_config, cfg, labels)
        assert rows is expected  # the very partition, untouched
        reply = train_once(tiny_bert, config, node_config, sent)
        assert reply.content["metrics"]["num-examples"] == len(expected) == 24
        assert reply.content["metrics"]["partition-id"] == 1


def test_server_train_config_carries_only_the_label_names(tiny_bert, server_identity):
    labels = ("spam", "ham", "other")
    record = make_train_config(labels)
    assert dict(record) == {"labels": ["spam", "ham", "other"]}  # the server's order, kept
    # The label list is all it adds to a train message: the key plus the names (len 6 + 12).
    assert record.count_bytes() == len("labels") + sum(len(n) for n in labels) == 18
    arrays = ArrayRecord(
        trainable_state(build_model(parse_run_config({"method": "lora"}), str(tiny_bert), LABELS))
    )
    with_labels = RecordDict({"arrays": arrays, "config": record})
    without = RecordDict({"arrays": arrays, "config": ConfigRecord({})})
    assert content_bytes(with_labels) - content_bytes(without) == record.count_bytes()
    msg = Message(with_labels, dst_node_id=11, message_type="train")
    assert server_labels(msg, parse_run_config({"dataset": "csv:/not/needed.csv"})) == labels


def test_prepared_rows_are_cached_on_disk_and_follow_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.NODE_CACHE_ENV, str(tmp_path / "cache"))
    path = write_toy_csv(tmp_path / "node.csv", rows=40)
    cfg = parse_run_config({"dataset": "csv:/not/needed.csv"})
    node_config = {"data": f"csv:{path}"}
    labels = ("negative", "positive")
    fresh = loading.node_train_data(node_config, cfg, labels)
    first = loading.cached_node_train_data(node_config, cfg, labels)  # prepares and saves
    [entry] = (tmp_path / "cache").iterdir()
    assert entry.suffix == ".json"  # plain lists: reading them back needs no `datasets`
    again = loading.cached_node_train_data(node_config, cfg, labels)  # loads the saved rows
    assert again.to_dict() == first.to_dict() == fresh.select_columns(["text", "label"]).to_dict()
    assert list(again.label_names) == fresh.features["label"].names == list(labels)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]

    write_toy_csv(path, rows=41, seed=5)  # the node's file changed: new rows, new entry
    loading._load_labelled_cached.cache_clear()  # as in the next message's fresh process
    changed = loading.cached_node_train_data(node_config, cfg, labels)
    assert len(changed) == 41 and len(list((tmp_path / "cache").iterdir())) == 2
    assert (
        len(loading.cached_node_train_data(node_config, cfg, ("negative", "positive", "x"))) == 41
    )
    assert len(list((tmp_path / "cache").iterdir())) == 3  # the server's labels are in the key

    monkeypatch.setenv(loading.NODE_CACHE_ENV, "off")
    assert loading.node_cache_dir() is None
    assert loading.cached_node_train_data(node_config, cfg, labels).to_dict() == changed.to_dict()
    assert len(list((tmp_path / "cache").iterdir())) == 3
