"""Run config: pyproject mirrors the schema, bad values give one clear line, strategies build."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from federa_app.config import DEFAULTS, STRATEGIES, parse_overrides, parse_run_config
from federa_app.errors import ConfigError
from federa_app.federation.strategies import (
    ABSOLUTE_DEFAULTS,
    RELATIVE_DEFAULTS,
    STRATEGY_CLASSES,
    build_strategy,
    resolved_parameters,
    strategy_settings,
)

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_the_schema():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server_app:app", "clientapp": "client_app:app"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "qlora"}, "valid choices are federa, lora, fft, bitfit, adapter, ffa-lora"),
        ({"strategy": "fedsgd"}, "valid choices are fedavg, fedavgm, fedprox"),
        ({"partitioner": "random"}, "dirichlet, iid, pathological, column:NAME"),
        ({"svd": "exact"}, "valid choices are full, randomized"),
        ({"lora-rank": 0}, "lora-rank=0 is invalid: must be >= 1"),
        ({"lora-rank": "8"}, "lora-rank='8' must be a int"),
        ({"learning-rate": -1.0}, "learning-rate=-1.0 is invalid: must be > 0"),
        ({"fraction-train": 1.5}, "fraction-train=1.5 is invalid"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha=0.0 is invalid: must be > 0"),
        ({"lora-rnk": 8}, "unknown run-config key 'lora-rnk'; valid keys are method, model"),
        ({"eta": "fast"}, "eta='fast' must be a float"),
        ({"run-name": "a/b"}, "run-name='a/b' is invalid"),
        ({"precision": "fp8"}, "precision='fp8' is invalid: valid choices are fp32, bf16, fp16"),
    ],
)
def test_bad_values_give_one_line_naming_value_and_choices(overrides, expected):
    with pytest.raises(ConfigError) as info:
        parse_run_config(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_ints_are_accepted_for_floats_and_defaults_fill_in():
    cfg = parse_run_config({"learning-rate": 1, "method": "lora"})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.lora_rank == DEFAULTS["lora-rank"]
    assert cfg.to_dict()["learning-rate"] == 1.0


def test_overrides_accept_unquoted_strings_like_people_type_them():
    parsed = parse_overrides("method=lora lora-rank=4 learning-rate=1e-3 dataset='csv:/a b.csv'")
    assert parsed == {
        "method": "lora",
        "lora-rank": 4,
        "learning-rate": 1e-3,
        "dataset": "csv:/a b.csv",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides("method lora")


def test_every_strategy_parameter_is_a_run_config_key():
    fedavg_params = set(inspect.signature(STRATEGY_CLASSES["fedavg"].__init__).parameters)
    # a callable; a metric name we fix; svd-avg's rank is lora-rank; FedAvg's own arguments
    not_settable = {"selection_rule", "train_loss_key", "rank", "fedavg_kwargs"}
    for name in STRATEGIES:
        params = set(inspect.signature(STRATEGY_CLASSES[name].__init__).parameters)
        for param in params - fedavg_params - not_settable:
            assert param.replace("_", "-") in DEFAULTS, (name, param)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_with_flowers_defaults_except_ours(name):
    cfg = parse_run_config({"strategy": name})
    strategy = build_strategy(cfg)
    if name == "svd-avg":
        assert strategy.rank == 8
    assert type(strategy) is STRATEGY_CLASSES[name]
    assert strategy.fraction_evaluate == 0.0  # the server evaluates centrally
    defaults = {
        k: p.default
        for k, p in inspect.signature(type(strategy).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    u = cfg.learning_rate * cfg.local_steps
    ours = {
        **{key: c * u for key, c in RELATIVE_DEFAULTS.get(name, {}).items()},
        **ABSOLUTE_DEFAULTS.get(name, {}),
    }
    _, sources = resolved_parameters(cfg)
    for key, value in strategy_settings(strategy, name).items():
        if key in ours:
            assert value == pytest.approx(ours[key]), (name, key)
            assert sources[key].startswith("federa default"), (name, key)
        else:
            assert value == defaults[key.replace("-", "_")], (name, key)
            assert sources[key] == "flower default", (name, key)


def test_strategy_parameters_are_set_and_checked():
    strategy = build_strategy(parse_run_config({"strategy": "fedadam", "eta": 0.05, "tau": 1e-4}))
    assert (strategy.eta, strategy.tau, strategy.beta_1) == (0.05, 1e-4, 0.9)
    prox = build_strategy(parse_run_config({"strategy": "fedprox", "proximal-mu": 0.1}))
    assert prox.proximal_mu == 0.1
    q = build_strategy(parse_run_config({"strategy": "qfedavg", "client-learning-rate": 0.003}))
    assert q.client_learning_rate == 0.003
    # The server optimisers' defaults follow the clients' movement per round.
    adam = build_strategy(parse_run_config({"strategy": "fedadam", "learning-rate": 0.002}))
    assert adam.eta == pytest.approx(RELATIVE_DEFAULTS["fedadam"]["eta"] * 0.002 * 10)
    assert adam.tau == pytest.approx(RELATIVE_DEFAULTS["fedadam"]["tau"] * 0.002 * 10)
    with pytest.raises(ConfigError, match="eta does not apply to strategy 'fedavg'"):
        build_strategy(parse_run_config({"eta": 0.05}))
    with pytest.raises(
        ConfigError, match="svd-avg .* works with method federa or lora, not 'bitfit'"
    ):
        build_strategy(parse_run_config({"strategy": "svd-avg", "method": "bitfit"}))
