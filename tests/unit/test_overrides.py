"""`--set KEY=VALUE` overrides: numbers in every notation people and templates write, strings kept as typed.

YAML 1.1 (PyYAML) reads `1e-5` as a string, `010` as octal 8 and `1:30` as 90; the parser reads the text by the
type of the key instead (taxonet.config: _split_override, _coerce). Helm's `toJson` writes floats as JSON numbers
(`0.00001`, `1e-7`, `1e+21`) and Go's `%v` as `1e-05`/`1e+06`; all of them must land unchanged.
"""

from __future__ import annotations

import json
import math

import pytest

from taxonet.config import ConfigError, load_config

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def loaded(*overrides: str):  # noqa: ANN201
    return load_config("demo", list(overrides))


@pytest.mark.parametrize(("text", "expected"), [
    ("1e-5", 1e-5), ("1E5", 1e5), ("1e+06", 1e6), ("-3.5e-2", -0.035), ("0.00001", 1e-5), ("1e-05", 1e-5),
    ("3", 3.0), ("+2.5", 2.5), (".5", 0.5), ("5.", 5.0), ("1_000", 1000.0), ("1_000.000_1", 1000.0001),
    ("2.5E-3", 0.0025), (" 1e-4 ", 1e-4), ("1e21", 1e21), ("-0", 0.0),
])
def test_a_float_key_accepts_every_decimal_notation(text: str, expected: float) -> None:
    config = loaded(f"optim.lr={text}")
    assert config.optim.lr == expected and isinstance(config.optim.lr, float)


@pytest.mark.parametrize(("text", "expected"), [
    ("1000000", 1_000_000), ("1e+06", 1_000_000), ("1E6", 1_000_000), ("1e6", 1_000_000), ("1_000", 1000),
    ("010", 10), ("+7", 7), ("2.0", 2), ("12345678901234567890123", 12345678901234567890123),
    ("1.2345678901234567890123e22", 12345678901234567890123),
])
def test_an_integer_key_accepts_whole_numbers_in_any_notation(text: str, expected: int) -> None:
    config = loaded(f"train.max_steps_per_epoch={text}")
    assert config.train.max_steps_per_epoch == expected and type(config.train.max_steps_per_epoch) is int


@pytest.mark.parametrize("text", ["2.5", "1e-1", "0x1A", "0o17", "1:30", "1__0", "_1", "1_", "1e", "inf", ".inf",
                                  "nan", "one", "[1]", "true", ""])
def test_an_integer_key_refuses_what_is_not_a_whole_decimal_number(text: str) -> None:
    with pytest.raises(ConfigError, match=r"train.max_steps_per_epoch must be an integer"):
        loaded(f"train.max_steps_per_epoch={text}")


@pytest.mark.parametrize("text", ["0x1A", "1:30", "1__0", "1e", "e5", "inf", ".inf", "-.inf", "nan", ".nan", "fast",
                                  "1,5", "true", "[1e-5]", ""])
def test_a_float_key_refuses_what_is_not_a_finite_decimal_number(text: str) -> None:
    with pytest.raises(ConfigError, match=r"optim.lr must be a (finite )?number"):
        loaded(f"optim.lr={text}")


def test_a_quoted_number_is_a_number_for_a_number_key() -> None:
    """Helm's toJson of a string value "5" and a person's '1e-5' in quotes."""
    assert loaded('optim.epochs="5"').optim.epochs == 5
    assert loaded("optim.lr='1e-5'").optim.lr == 1e-5
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        loaded('optim.epochs="five"')
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        loaded("optim.epochs=0x1A")  # YAML 1.1 reads 26: refused, not taken from the YAML reading


def test_null_is_refused_for_number_keys_and_kept_for_optional_strings() -> None:
    with pytest.raises(ConfigError, match="optim.lr may not be null"):
        loaded("optim.lr=null")
    with pytest.raises(ConfigError, match="optim.epochs may not be null"):
        loaded("optim.epochs=~")
    assert loaded("model.weights=null").model.weights is None


@pytest.mark.parametrize(("text", "expected"), [
    ("007", "007"), ("1e-5", "1e-5"), ("true", "true"), ("2024-01-01", "2024-01-01"), ("1_000", "1_000"),
    ('"exp 2"', "exp 2"), ("'quoted'", "quoted"), ("x=y", "x=y"), ("s3://bucket/runs", "s3://bucket/runs"),
])
def test_a_string_key_keeps_the_text_as_typed(text: str, expected: str) -> None:
    assert loaded(f"train.run_name={text}").train.run_name == expected


def test_list_keys_read_each_element_as_a_number() -> None:
    assert loaded("data.mean=[1e-1, 2E-1, 0.3]").data.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match=r"data.mean\[1\] must be a number"):
        loaded("data.mean=[0.1, red, 0.3]")


def test_booleans_still_read_as_yaml() -> None:
    assert loaded("train.use_gpu=true").train.use_gpu is True
    assert loaded("train.use_gpu=false").train.use_gpu is False
    with pytest.raises(ConfigError, match="train.use_gpu must be true/false"):
        loaded("train.use_gpu=1")


FLOATS = [1e-5, 1e-7, 3e-4, 0.1, 1 / 3, -3.5e-2, 2.5, 1e21, 123456.789, 5e-324, 1.7976931348623157e308]


@pytest.mark.parametrize("value", FLOATS)
def test_floats_round_trip_through_json_repr_and_go_notation(value: float) -> None:
    """What Helm's toJson (JSON), Go's %v (like Python's repr: 1e-05, 1e+21) and %.17e write reads back unchanged."""
    for text in (json.dumps(value), repr(value), f"{value:.17e}", f"{value:.17E}"):
        assert loaded(f"anomaly.k={text}").anomaly.k == value, text


@pytest.mark.parametrize("value", [1, 1000, 10**6, 2**31, 2**53, 10**18, 2**63 + 1])
def test_large_integers_round_trip_exactly(value: int) -> None:
    for text in (str(value), json.dumps(value), f"{value:_}"):
        assert loaded(f"train.max_steps_per_epoch={text}").train.max_steps_per_epoch == value
    if value <= 2**53:  # a float carries it exactly: what Helm holds for every number in its values
        assert loaded(f"train.max_steps_per_epoch={json.dumps(float(value))}").train.max_steps_per_epoch == value


def test_numbers_in_config_files_read_the_same_way(tmp_path) -> None:
    """A YAML file's `lr: 1e-4` (a string to YAML 1.1) is the number 1e-4 for the float key."""
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\noptim: {lr: 1e-4, epochs: 1e+1}\ntrain: {max_steps_per_epoch: 1_000_000}\n")
    config = load_config(path)
    assert (config.optim.lr, config.optim.epochs, config.train.max_steps_per_epoch) == (1e-4, 10, 1_000_000)
    path.write_text("name: mine\noptim: {lr: .inf}\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        load_config(path)
    assert math.isfinite(load_config("demo").optim.lr)


def test_dict_overrides_accept_numbers_and_number_strings() -> None:
    config = load_config("demo").with_overrides({"optim.lr": "1e-5", "optim.epochs": 3.0, "anomaly.k": 2})
    assert (config.optim.lr, config.optim.epochs, config.anomaly.k) == (1e-5, 3, 2.0)
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        load_config("demo").with_overrides({"optim.epochs": True})
