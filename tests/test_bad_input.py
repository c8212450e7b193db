"""Bad input: one clear line naming the bad value and what is valid, before anything starts."""

from __future__ import annotations

import time

import pytest
from conftest import write_toy_csv

from federa_ops.cli import main


@pytest.fixture
def run(tmp_path, capsys, monkeypatch):
    """Run `federa simulate` with extra run-config; return (exit code, stderr, seconds)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def _run(run_config: str, *extra: str) -> tuple[int, str, float]:
        start = time.perf_counter()
        code = main(
            ["simulate", "--num-clients", "3", "--output-dir", str(tmp_path / "runs"),
             "--run-config", run_config, *extra]
        )  # fmt: skip
        err = capsys.readouterr().err.strip()
        return code, err, time.perf_counter() - start

    return _run


def _base(tmp_path, tiny_bert) -> str:
    csv = write_toy_csv(tmp_path / "toy.csv")
    return f"model={tiny_bert} dataset=csv:{csv}"


@pytest.mark.parametrize(
    ("run_config", "expected"),
    [
        ("method=qlora", "method='qlora' is invalid: valid choices are federa, lora, fft"),
        ("method=bitfit strategy=svd-avg", "works with method federa or lora, not 'bitfit'"),
        ("strategy=fedsgd", "strategy='fedsgd' is invalid: valid choices are fedavg"),
        ("partitioner=random", "valid choices are dirichlet, iid, pathological, column:NAME"),
        ("lora-rnk=8", "unknown run-config key 'lora-rnk'"),
        ("lora-rank=64", "lora-rank=64 is larger than"),
        ("target-modules=qkv", "target-modules 'qkv' match no linear layer"),
        ("dataset=imdb", "imdb"),
        ("model=no-such-org/no-such-model", "could not be loaded from the Hugging Face hub"),
        ("eta=0.1", "eta does not apply to strategy 'fedavg'"),
    ],
)
def test_bad_values_fail_fast_with_one_line(tmp_path, tiny_bert, run, run_config, expected):
    code, err, seconds = run(f"{_base(tmp_path, tiny_bert)} {run_config}")
    assert code == 2
    assert err.startswith("federa: error: ") and expected in err
    assert len(err.splitlines()) == 1
    assert seconds < 30  # nothing was started
    assert not (tmp_path / "runs").exists()


def test_missing_label_column(tmp_path, tiny_bert, run):
    csv = tmp_path / "nolabel.csv"
    csv.write_text("text,sentiment\ngood film,1\nbad film,0\n")
    code, err, _ = run(f"model={tiny_bert} dataset=csv:{csv}")
    assert code == 2 and "label" in err and "sentiment" in err


def test_empty_client_partition(tmp_path, tiny_bert, run):
    code, err, _ = run(_base(tmp_path, tiny_bert), "--num-clients", "500")
    assert code == 2 and "500" in err and "partition" in err


def test_missing_asset_while_offline(tmp_path, run, monkeypatch):
    monkeypatch.setenv("FEDERA_HOME", str(tmp_path / "empty-home"))
    code, err, _ = run("model=minilm-l6")
    assert code == 2 and "minilm-l6" in err and "federa fetch" in err


def test_too_few_clients_for_the_strategy(tmp_path, tiny_bert, run):
    code, err, _ = run(_base(tmp_path, tiny_bert), "--num-clients", "1")
    assert code == 2 and "--num-clients 1" in err and "min-train-nodes" in err


def test_an_existing_run_directory_is_never_overwritten(tmp_path, tiny_bert, run):
    existing = tmp_path / "runs" / "mine"
    existing.mkdir(parents=True)
    (existing / "summary.json").write_text("{}")
    code, err, _ = run(f"{_base(tmp_path, tiny_bert)} run-name=mine")
    assert code == 2 and "already exists" in err
    assert (existing / "summary.json").read_text() == "{}"
