"""Shared fixtures: a tiny randomly initialised BERT saved as a local model directory."""

from __future__ import annotations

import os
import tempfile

# The hub is unreachable here: say so up front instead of letting each lookup time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two xdist workers: with torch's default of a thread per core in each, OpenMP's
# spinning barriers oversubscribe the cores and in-process training runs ~5x slower (measured:
# tests/test_methods.py beside two busy processes, 133 s with 2 threads, 25 s with 1). Each
# worker gets its share; simulations and deployments the tests start inherit it. (Only in a
# worker: they inherit the controller's environment, which must keep the user's setting.)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
# The simulations a test starts run cores/workers Ray actors each (a client claims `workers` of
# the CPUs Ray sees): the workers already fill the cores, and every actor costs ~12 s of CPU to
# start (imports, model, node data) for the well under a second its toy clients train.
SIM_CPUS_PER_CLIENT = _WORKERS
# Nodes cache their prepared rows on disk (loading.cached_node_train_data): keep the tests' apart.
os.environ.setdefault("FEDERA_NODE_CACHE", tempfile.mkdtemp(prefix="federa-test-node-cache-"))

import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizer  # noqa: E402

from client_app import app as client_app  # noqa: E402

RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "adapter", "accuracy.png"}
METRIC_FIELDS = {
    "round", "accuracy", "macro_f1", "loss", "train_loss", "bytes_up", "bytes_down", "clients",
    "client_seconds_max", "client_seconds_sum", "round_seconds",
}  # fmt: skip
SUMMARY_FIELDS = {
    "method", "model", "dataset", "strategy", "rounds", "final_accuracy", "best_accuracy",
    "trainable_params", "total_params", "bytes_up_total", "bytes_down_total", "wall_seconds",
}  # fmt: skip


def check_run_directory(run_dir: Path, rounds: int) -> tuple[list[dict], dict]:
    """Assert DESIGN.md's run-directory contract; return the metrics rows and the summary."""
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(METRIC_FIELDS <= set(r) for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["rounds"] == rounds and summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)
    assert summary["bytes_down_total"] == sum(r["bytes_down"] for r in rows)
    assert any((run_dir / "adapter").glob("*.safetensors"))  # the final model, saved
    return rows, summary


WORDS = (
    "good great fine superb lovely fun bad awful boring dull poor sad the a movie film plot "
    "actor is was very not and but of it this that"
).split()


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer, 32-wide BERT encoder (no head) and a word-level vocab to `path`."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes `vocab=`; the old `vocab_file=` is silently ignored (all [UNK]).
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        # At BERT's 0.02 a random 2-layer encoder's [CLS] output carries almost no token signal,
        # so only attention-changing methods (LoRA, fft) could learn the toy task; 0.2 lets all.
        initializer_range=0.2,
    )
    BertModel(config).save_pretrained(path)
    return path


# `make test` hands whole files to its two workers in collection order (two each to start, then
# one to whichever finishes a file): the files that run simulations and deployments go first,
# longest first (make test's --durations), so that no long file starts last.
LONGEST_FIRST = ("test_integration.py", "test_deploy.py", "test_compare.py", "test_strategies.py",
                 "test_simulation.py", "test_faults.py", "test_methods.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT model directory, usable wherever a `model` path is accepted."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def frozen_heap():
    """QFedAvg, Krum and Bulyan make Flower call gc.collect() per record (0.3 s each over a heap
    holding torch and transformers); freezing what is alive now makes those calls cheap."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let tests build flwr Messages: they take run/node/task ids from the runtime, as in a
    ServerApp (outside one, `Message(...)` raises "TaskIdentity.run_id is not set")."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def write_toy_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """A learnable two-class sentiment CSV: the label follows the positive/negative words."""
    rng = random.Random(seed)
    pos, neg, filler = WORDS[:6], WORDS[6:12], WORDS[12:]
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.randint(0, 1)
        words = rng.sample(pos if label else neg, 2) + rng.sample(filler, 4)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'positive' if label else 'negative'}")
    path.write_text("\n".join(lines) + "\n")
    return path


class InProcessGrid:
    """The Grid surface the server and Flower's strategies use: node ids and, if `contexts` are
    given, a send_and_receive that runs the real ClientApp (mods included) on each node's
    Context in this process: a whole federation without Ray or a SuperLink."""

    def __init__(self, node_ids, contexts: dict[int, Context] | None = None) -> None:
        self.node_ids = list(node_ids)
        self.contexts = contexts or {}
        self.replies: list[Message] = []
        self._ids = itertools.count()

    def get_node_ids(self):
        self._calls = getattr(self, "_calls", 0) + 1  # Flower polls (sleeping 1 s) for more
        if self._calls > 50:
            raise RuntimeError("the strategy waits for more nodes than this grid has")
        return self.node_ids

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:  # the SuperLink gives each message an id; replies refer to it
            message.metadata.__dict__["_message_id"] = f"message-{next(self._ids)}"
            replies.append(client_app(message, self.contexts[message.metadata.dst_node_id]))
        self.replies += replies
        return replies
