"""Property tests over the run-config parser: every bad value gives one clean line, never a
traceback deep in training; every valid config parses and survives the `--run-config` round trip.

The key lists come from `DEFAULTS`, `STRATEGY_PARAMS` and the choice tuples in `config`, so a new
key is covered by the type properties at once; the tests that need its valid range fail until
the key has an entry in `RANGES` (or `FREE_STRINGS`) below.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from flwr.common.config import parse_config_args
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from federa_app import config
from federa_app.config import (
    DEFAULTS,
    SECAGG_UNAVAILABLE,
    STRATEGY_PARAMS,
    parse_overrides,
    parse_run_config,
    to_flwr_overrides,
)
from federa_app.errors import ConfigError

PROPS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# The type each key is parsed as: its default's type; "" defaults are strategy parameters (their
# type in STRATEGY_PARAMS), learning-rate ("" = the method's own rate) or free strings.
KINDS: dict[str, type] = {
    **{key: type(default) for key, default in DEFAULTS.items()},
    **STRATEGY_PARAMS,
    "learning-rate": float,
}
OPTIONAL = {key for key, default in DEFAULTS.items() if default == "" and KINDS[key] is not str}
KEYS_OF = {kind: sorted(k for k, v in KINDS.items() if v is kind) for kind in (int, float, str)}

# String keys with a fixed set of values: the tuple in `config` that holds the key's default.
CHOICES: dict[str, tuple[str, ...]] = {
    key: next(
        v
        for v in vars(config).values()
        if isinstance(v, tuple) and all(isinstance(c, str) for c in v) and DEFAULTS[key] in v
    )
    for key in KEYS_OF[str]
    if any(isinstance(v, tuple) and DEFAULTS[key] in v for v in vars(config).values())
}
PARTITIONER_CHOICES = ("dirichlet", "iid", "pathological")  # or column:NAME
RUN_NAME = r"[A-Za-z0-9._-]*"
FREE_STRINGS = {"model", "dataset", "target-modules", "output-dir", "resume-from"}


@dataclass(frozen=True)
class Range:
    """A numeric key's valid interval with every other key at its default."""

    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below


AT_LEAST_1 = Range(lo=1)
AT_LEAST_0 = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
UNIT = Range(0, False, 1, True)  # [0, 1)
RANGES: dict[str, Range] = {
    "server-learning-rate": POSITIVE,
    "server-momentum": UNIT,
    "proximal-mu": AT_LEAST_0,
    "eta": POSITIVE,
    "eta-l": POSITIVE,
    "beta-1": UNIT,
    "beta-2": UNIT,
    "tau": POSITIVE,
    "beta": Range(0, False, 0.5, True),  # FedTrimmedAvg cuts this fraction from each end
    "num-malicious-nodes": AT_LEAST_0,
    "num-nodes-to-select": AT_LEAST_1,
    "q": AT_LEAST_0,
    "client-learning-rate": POSITIVE,
    "num-server-rounds": AT_LEAST_1,
    "dirichlet-alpha": POSITIVE,
    "classes-per-client": AT_LEAST_1,
    "test-fraction": Range(0, True, 1, True),
    "lora-rank": AT_LEAST_1,
    "lora-alpha": POSITIVE,
    "lora-dropout": Range(0, False, 1, True),
    "adapter-size": AT_LEAST_1,
    "svd-niter": AT_LEAST_1,
    "local-steps": AT_LEAST_1,  # 0 only with local-epochs >= 1 (a test below)
    "local-epochs": AT_LEAST_0,
    "batch-size": AT_LEAST_1,
    "eval-batch-size": AT_LEAST_1,
    "learning-rate": POSITIVE,
    "weight-decay": AT_LEAST_0,
    "max-grad-norm": AT_LEAST_0,
    "warmup-ratio": Range(0, False, 1, True),
    "max-length": AT_LEAST_1,
    "fraction-train": Range(0, True, 1, False),
    "min-train-nodes": AT_LEAST_0,
    "min-available-nodes": AT_LEAST_0,
    "num-threads": AT_LEAST_0,
    "seed": Range(0, False, 2**32, True),
    "eval-max-examples": AT_LEAST_0,
    "target-accuracy": Range(0, False, 1, False),
    "device-slowdown": POSITIVE,
    "uplink-mbps": POSITIVE,
    "downlink-mbps": POSITIVE,
    "max-update-norm": AT_LEAST_0,
    "dp-noise-multiplier": AT_LEAST_0,
    "dp-clipping-norm": POSITIVE,
}
INT64 = 2**63


def assert_one_line_naming(info: pytest.ExceptionInfo, key: str) -> str:
    message = str(info.value)
    assert "\n" not in message and len(message.splitlines()) == 1, message
    assert f"run-config {key}=" in message, message
    return message


def finite_floats(**kwargs: Any) -> st.SearchStrategy[float]:
    return st.floats(allow_nan=False, allow_infinity=False, **kwargs)


def valid_numbers(key: str) -> st.SearchStrategy[Any]:
    r = RANGES[key]
    if KINDS[key] is int:
        lo = None if r.lo is None else int(r.lo) + r.lo_open
        hi = INT64 - 1 if r.hi is None else int(r.hi) - r.hi_open
        return st.integers(lo, hi)
    lo_open, hi_open = r.lo_open and r.lo is not None, r.hi_open and r.hi is not None
    floats = finite_floats(min_value=r.lo, max_value=r.hi, exclude_min=lo_open, exclude_max=hi_open)
    # whole numbers are fine where floats are wanted (TOML `lora-alpha = 16`)
    ints = st.integers(-(2**53), 2**53).filter(lambda v: v in r)
    return floats.filter(lambda v: v in r) | ints


def invalid_numbers(key: str) -> st.SearchStrategy[Any]:
    """Finite numbers of the key's kind outside its range (ints: TOML's 64 bits at most)."""
    r = RANGES[key]
    parts = []
    if KINDS[key] is int:
        lo = -INT64 if r.lo is None else r.lo
        hi = INT64 - 1 if r.hi is None else r.hi
        parts.append(st.integers(max_value=int(lo) - (not r.lo_open)))
        parts.append(st.integers(min_value=int(hi) + (not r.hi_open)))
        parts.append(st.sampled_from([-INT64 - 1, INT64, 10**30, -(10**30)]))
    else:
        if r.lo is not None:
            parts.append(finite_floats(max_value=r.lo) | st.integers(max_value=int(r.lo)))
        if r.hi is not None:
            parts.append(finite_floats(min_value=r.hi) | st.integers(min_value=int(r.hi)))
    assert parts, f"{key} has no bounds: say why in RANGES"
    return st.one_of(parts).filter(lambda v: v not in r)


def valid_values(key: str) -> st.SearchStrategy[Any]:
    kind = KINDS[key]
    if key == "secagg":
        return st.just(False)  # always refused: SECAGG_UNAVAILABLE
    if kind is bool:
        return st.booleans()
    if kind in (int, float):
        numbers = valid_numbers(key)
        return st.just("") | numbers if key in OPTIONAL else numbers
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if key == "partitioner":
        return st.sampled_from(PARTITIONER_CHOICES) | st.text(min_size=1).map("column:".__add__)
    if key == "run-name":
        return st.from_regex(RUN_NAME, fullmatch=True)
    assert key in FREE_STRINGS, f"new string key {key}: add it to CHOICES or FREE_STRINGS"
    return st.text()


valid_configs = st.fixed_dictionaries({}, optional={key: valid_values(key) for key in DEFAULTS})

# Python values of a kind other than the key's; floats with a fractional part are not ints.
any_container = (
    st.none()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
WRONG_TYPE = {
    int: st.text() | st.booleans() | st.floats().filter(lambda v: not float(v).is_integer()),
    float: st.text(min_size=1) | st.booleans(),
    str: st.integers() | st.floats() | st.booleans(),
    bool: st.integers() | st.floats() | st.text(),
}


# --- the key lists this file derives are what config.py declares -------------------------------


def test_every_key_is_classified():
    assert set(KINDS) == set(DEFAULTS)
    numeric = {k for k, v in KINDS.items() if v in (int, float)}
    assert set(RANGES) == numeric, "give each new numeric key its valid range in RANGES"
    strings = set(KEYS_OF[str])
    assert strings == set(CHOICES) | {"partitioner", "run-name"} | FREE_STRINGS
    assert {"method", "strategy", "svd", "lr-schedule", "dp"} <= set(CHOICES)
    assert CHOICES["dp"] == config.DP_MODES and CHOICES["method"] == config.METHODS
    for key, default in DEFAULTS.items():  # the defaults themselves are valid
        if default != "" and KINDS[key] in (int, float):
            assert default in RANGES[key], key


# --- 1. wrong types --------------------------------------------------------------------------


@PROPS
@given(data=st.data(), key=st.sampled_from(sorted(DEFAULTS)))
def test_a_value_of_the_wrong_type_gives_one_line_naming_the_key(data, key):
    value = data.draw(WRONG_TYPE[KINDS[key]] | any_container, label="value")
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: value})
    assert_one_line_naming(info, key)


@pytest.mark.parametrize("value", [-(10**5000), [10**5000], 10**5000], ids=["-big", "[big]", "big"])
@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_an_int_python_cannot_print_still_gives_one_line(key, value):
    """Ints of over 4300 digits make repr() raise ValueError; the message must not."""
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: value})
    assert_one_line_naming(info, key)


# --- 2. out of range ---------------------------------------------------------------------------


@PROPS
@given(data=st.data(), key=st.sampled_from(sorted(RANGES)))
def test_an_out_of_range_number_gives_one_line_naming_the_key(data, key):
    value = data.draw(invalid_numbers(key), label="value")
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: value})
    assert_one_line_naming(info, key)


NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1e400": 10**400,
              "-1e400": -(10**400)}  # fmt: skip


@pytest.mark.parametrize("text", NON_FINITE)
@pytest.mark.parametrize("key", sorted(k for k, v in KINDS.items() if v in (int, float)))
def test_nan_inf_and_overflowing_numbers_are_refused_for_every_numeric_key(key, text):
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: NON_FINITE[text]})
    assert_one_line_naming(info, key)
    # the same through the command line: TOML has nan and inf, 1e400 overflows to inf
    with pytest.raises(ConfigError) as info:
        parse_run_config(parse_overrides(f"{key}={text}"))
    assert_one_line_naming(info, key)


@pytest.mark.parametrize("text", [str(INT64), str(-INT64 - 1), "1e300"])
@pytest.mark.parametrize("key", KEYS_OF[int])
def test_ints_beyond_64_bits_are_refused_for_every_int_key(key, text):
    with pytest.raises(ConfigError) as info:
        parse_run_config(parse_overrides(f"{key}={text}"))
    assert_one_line_naming(info, key)


def boundary_values(key: str) -> list[Any]:
    """Each bound, and its nearest neighbours on both sides, in the key's kind."""
    r = RANGES[key]
    bounds = [b for b in (r.lo, r.hi) if b is not None]
    if KINDS[key] is int:
        return sorted({b + d for b in bounds for d in (-1, 0, 1)} | {INT64 - 1, -INT64})
    near = [math.nextafter(b, d) for b in bounds for d in (-math.inf, math.inf)]
    return sorted({float(b) for b in bounds} | set(near) | {-sys.float_info.max, 1e308})


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_bound_is_exactly_where_ranges_says(key):
    for value in boundary_values(key):
        if value in RANGES[key]:
            assert parse_run_config({key: value}).to_dict()[key] == value, (key, value)
        else:
            with pytest.raises(ConfigError) as info:
                parse_run_config({key: value})
            assert_one_line_naming(info, key)


@PROPS
@given(local_epochs=st.integers(0, 50))
def test_local_steps_may_be_0_only_when_local_epochs_counts(local_epochs):
    overrides = {"local-steps": 0, "local-epochs": local_epochs}
    if local_epochs >= 1:
        assert parse_run_config(overrides).local_steps == 0
    else:
        with pytest.raises(ConfigError) as info:
            parse_run_config(overrides)
        assert "must be >= 1 unless local-epochs >= 1" in assert_one_line_naming(
            info, "local-steps"
        )


def test_secagg_true_is_always_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"secagg": True})
    assert SECAGG_UNAVAILABLE in assert_one_line_naming(info, "secagg")


# --- 3. unknown keys and string choices --------------------------------------------------------


@PROPS
@given(key=st.text().filter(lambda k: k not in DEFAULTS), valid=valid_configs)
def test_an_unknown_key_is_refused_listing_the_valid_keys(key, valid):
    with pytest.raises(ConfigError) as info:
        parse_run_config({**valid, key: 1})
    message = str(info.value)
    assert "\n" not in message
    assert f"unknown run-config key {key!r}" in message
    assert message.endswith("valid keys are " + ", ".join(DEFAULTS))


@PROPS
@given(data=st.data(), key=st.sampled_from(sorted(CHOICES)))
def test_a_choice_key_refuses_any_other_text_naming_the_choices(data, key):
    value = data.draw(st.text().filter(lambda v: v not in CHOICES[key]), label="value")
    with pytest.raises(ConfigError) as info:
        parse_run_config({key: value})
    message = assert_one_line_naming(info, key)
    assert message.endswith("valid choices are " + ", ".join(CHOICES[key]))


@PROPS
@given(value=st.text().filter(lambda v: v not in PARTITIONER_CHOICES and v[:7] != "column:"))
@example(value="column:")
def test_the_partitioner_refuses_other_text_naming_the_choices(value):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"partitioner": value})
    assert config.PARTITIONER_HELP in assert_one_line_naming(info, "partitioner")


@PROPS
@given(value=st.text().filter(lambda v: re.fullmatch(RUN_NAME, v) is None))
def test_the_run_name_refuses_other_characters(value):
    with pytest.raises(ConfigError) as info:
        parse_run_config({"run-name": value})
    assert_one_line_naming(info, "run-name")


@PROPS
@given(data=st.data(), key=st.sampled_from(sorted(FREE_STRINGS)))
def test_free_strings_take_any_text(data, key):
    value = data.draw(st.text(), label="value")
    cfg = parse_run_config({key: value}).to_dict()
    if key == "target-modules":
        assert cfg[key] == ",".join(t.strip() for t in value.split(",") if t.strip())
    else:
        assert cfg[key] == value


# --- 4. valid configs parse and round-trip -----------------------------------------------------


@PROPS
@given(overrides=valid_configs)
@example(overrides={"dataset": 'csv:/a "b" c.csv', "model": "it's \\ \U0001f600", "seed": 0})
@example(overrides={"output-dir": 'x" y=1', "resume-from": "a\nb\x7f\x00", "learning-rate": ""})
def test_valid_configs_parse_and_round_trip_through_run_config_text(overrides):
    cfg = parse_run_config(overrides)
    text = to_flwr_overrides(overrides)
    assert parse_overrides(text) == overrides
    assert parse_run_config(parse_overrides(text)) == cfg
    # Flower's own `--run-config` parser reads the same values
    assert parse_config_args([text]) == overrides
    # and the saved config (`RunConfig.to_dict`) parses back to the same config
    assert parse_run_config(cfg.to_dict()) == cfg


@PROPS
@given(data=st.data(), key=st.sampled_from(sorted(RANGES)))
def test_every_number_in_range_is_accepted(data, key):
    value = data.draw(valid_numbers(key), label="value")
    parsed = parse_run_config({key: value}).to_dict()[key]
    assert parsed == value and type(parsed) is KINDS[key]


# --- 5. parse_overrides on arbitrary text ------------------------------------------------------

toml_ish = st.sampled_from(
    ["1", "-3", "1.5", "1e400", "nan", "-inf", "true", "[1,2]", "{a=1}", "1979-05-27", '"x"',
     "'y'", '"', "'", "=", "[", "0x1f", "1_000", '"a\\"b"', "[" * 700 + "]" * 700]
)  # fmt: skip
run_config_text = st.lists(
    st.tuples(st.sampled_from(sorted(DEFAULTS)) | st.text(max_size=5), toml_ish | st.text()),
    max_size=5,
).map(lambda pairs: " ".join(f"{k}={v}" for k, v in pairs))


@PROPS
@given(text=st.text() | run_config_text)
@example(text="lora-rank=" + "1" * 5000)
@example(text="target-modules=" + "[" * 5000 + "]" * 5000)
@example(text="learning-rate=1e400 seed=-1")
@example(text='dataset="a\\"b" model=it\'s x')
def test_any_text_gives_a_run_config_or_one_clean_line(text):
    try:
        overrides = parse_overrides(text)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(overrides, dict) and all(isinstance(k, str) for k in overrides)
    try:
        parse_run_config(overrides)
    except ConfigError as err:
        assert "\n" not in str(err) and "run-config" in str(err)
