"""Optimizer configs: every bad value is refused naming its field, and the schema the REST API and the
dashboard read is exactly what the validator accepts."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dykaf import DyKAF, DyKAFConfig, kronecker
from dykaf.baselines import REGISTRY, all_schemas, build_optimizer, validate_hyperparameters
from dykaf.baselines.configs import GRAFTS
from dykaf.config import OptimizerConfig, hyperparameter
from dykaf.options import factor_beta

CONFIGS: list[type[OptimizerConfig]] = sorted({e.config for e in REGISTRY.values()}, key=lambda c: c.__name__)
FIELDS = [(config, name) for config in CONFIGS for name in config.hyperparameters()]
FIELD_IDS = [f"{config.__name__}.{name}" for config, name in FIELDS]


def _accepted_by_schema(entry: dict[str, Any], value: float) -> bool:
    """The schema's range as a client reads it (what web/static/js/stats.js checkValue does)."""
    return (
        ("minimum" not in entry or value >= entry["minimum"])
        and ("maximum" not in entry or value <= entry["maximum"])
        and ("exclusive_minimum" not in entry or value > entry["exclusive_minimum"])
        and ("exclusive_maximum" not in entry or value < entry["exclusive_maximum"])
    )


def _bad_values(entry: dict[str, Any]) -> list[Any]:
    """Values the schema entry says are invalid: wrong types, non-finite, just outside each bound."""
    if entry["type"] == "boolean":
        return ["yes", 1, None]
    if entry["type"] == "string":
        return ["no-such-choice", 3, None]
    bad: list[Any] = ["fast", True, float("nan"), float("inf")]
    if not entry.get("nullable"):
        bad.append(None)
    if entry["type"] == "integer":
        bad.append(1.5)
    for key in ("minimum", "exclusive_minimum"):
        if key in entry:
            step = 1 if entry["type"] == "integer" else abs(entry[key]) * 1e-9 or 1e-12
            bad.append(entry[key] - step if key == "minimum" else entry[key])
    for key in ("maximum", "exclusive_maximum"):
        if key in entry:
            step = 1 if entry["type"] == "integer" else abs(entry[key]) * 1e-9 or 1e-12
            bad.append(entry[key] + step if key == "maximum" else entry[key])
    return bad


@pytest.mark.parametrize(("config", "name"), FIELDS, ids=FIELD_IDS)
def test_every_bad_value_is_refused_with_a_message_naming_the_field(
    config: type[OptimizerConfig], name: str
) -> None:
    entry = config.schema()[name]
    for value in _bad_values(entry):
        with pytest.raises(ValueError, match=rf"^{name} must be .*, got ") as info:
            config(**{name: value})
        assert repr(value) in str(info.value) or isinstance(value, float), str(info.value)


@pytest.mark.parametrize(("config", "name"), FIELDS, ids=FIELD_IDS)
def test_the_range_edges_the_schema_states_are_the_validators(
    config: type[OptimizerConfig], name: str
) -> None:
    entry = config.schema()[name]
    if entry["type"] not in ("number", "integer"):
        return
    edges = [entry[k] for k in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum") if k in entry]
    probes = {-1e9, -1, 0, 0.5, 1, 2.5, 1e9, entry["default"]} - {None}
    for edge in edges:
        if entry["type"] == "integer":
            probes |= {int(edge) - 1, int(edge), int(edge) + 1}
        else:
            probes |= {edge, math.nextafter(edge, -math.inf), math.nextafter(edge, math.inf)}
    if entry["type"] == "integer":
        probes = {int(p) for p in probes if float(p).is_integer()}
    for value in sorted(probes):
        expected = _accepted_by_schema(entry, value)
        try:
            config(**{name: value})
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == expected, (name, value, entry)


@given(data=st.data())
def test_any_number_is_accepted_exactly_when_the_schema_says_so(data: st.DataObject) -> None:
    config, name = data.draw(st.sampled_from([f for f in FIELDS if f[0].schema()[f[1]]["type"] == "number"]))
    entry = config.schema()[name]
    value = data.draw(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6))
    try:
        made = config(**{name: value})
    except ValueError as error:
        assert not _accepted_by_schema(entry, value), (name, value, str(error))
        assert str(error).startswith(f"{name} must be ")
    else:
        assert _accepted_by_schema(entry, value), (name, value)
        assert getattr(made, name) == value


def test_the_registry_serves_the_configs_schemas() -> None:
    for schema in all_schemas():
        entry = REGISTRY[schema["name"]]
        expected = {k: v for k, v in entry.config.schema().items() if k not in entry.preset}
        assert schema["hyperparameters"] == expected
        # The defaults a client reads are a valid config of that optimizer.
        defaults = {k: v["default"] for k, v in schema["hyperparameters"].items()}
        assert validate_hyperparameters(schema["name"], defaults) == defaults


def test_preset_fields_are_not_the_users_to_set() -> None:
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) 'factor_rule' for soap"):
        validate_hyperparameters("soap", {"factor_rule": "parallel"})
    assert "factor_rule" not in REGISTRY["dykaf"].hyperparameters
    assert REGISTRY["dykaf-seq"].configure({}).factor_rule == "sequential"


def test_types_come_from_the_annotations() -> None:
    schema = DyKAFConfig.schema()
    assert schema["lr"]["type"] == "number" and schema["precondition_frequency"]["type"] == "integer"
    assert schema["precondition_1d"]["type"] == "boolean"
    assert schema["shampoo_beta"]["nullable"] is True and "nullable" not in schema["beta2"]
    # The Literal types the configs use are the values the engine dispatches on.
    assert tuple(schema["factor_rule"]["enum"]) == kronecker.FACTOR_RULES
    assert tuple(schema["init"]["enum"]) == kronecker.INIT_RULES
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    assert {g.upper() for g in GRAFTS} <= set(LayerWiseGrafting.__members__)


def test_values_are_normalised_and_the_config_is_frozen() -> None:
    config = DyKAFConfig(lr=1, precondition_frequency=20.0)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.precondition_frequency == 20 and isinstance(config.precondition_frequency, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.5  # type: ignore[misc]
    assert factor_beta(config.as_kwargs()) == config.beta2 == 0.95
    assert factor_beta(DyKAFConfig(shampoo_beta=0.9).as_kwargs()) == 0.9


def test_a_field_without_a_schema_is_a_programming_error() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Bare(OptimizerConfig):
        lr: float = 0.1

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Odd(OptimizerConfig):
        sizes: list = hyperparameter((), "not a scalar")

    for config in (Bare, Odd):
        with pytest.raises(TypeError, match="config field"):
            config.schema()

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Choice(OptimizerConfig):
        mode: Literal["a", "b"] = hyperparameter("a", "a or b")

    assert Choice.schema()["mode"] == {"type": "string", "default": "a", "help": "a or b", "enum": ["a", "b"]}


def test_dyKAF_keyword_arguments_go_through_the_same_config() -> None:
    param = nn.Parameter(torch.ones(2, 2))
    assert DyKAF([param]).defaults == DyKAFConfig().as_kwargs()
    for name in DyKAFConfig.hyperparameters():
        if name in ("beta1", "beta2"):
            continue
        for value in _bad_values(DyKAFConfig.schema()[name]):
            with pytest.raises(ValueError, match=rf"^{name} must be "):
                DyKAF([param], **{name: value})
    with pytest.raises(ValueError, match=r"^betas must be a pair"):
        DyKAF([param], betas=(0.9,))
    with pytest.raises(ValueError, match=r"^betas\[1\] must be >= 0 and < 1, got 1.0"):
        DyKAF([param], betas=(0.9, 1.0))


def test_library_and_service_accept_the_same_values() -> None:
    """What the REST API accepts for the engine builds, and what it refuses the library refuses."""
    model = nn.Linear(3, 2)
    built = build_optimizer("dykaf", model.named_parameters(), {"lr": 0.0, "beta1": 0.5})
    assert built.param_groups[0]["lr"] == 0.0 and built.param_groups[0]["betas"] == (0.5, 0.95)
    with pytest.raises(ValueError, match="lr must be >= 0 and <= 10") as service:
        validate_hyperparameters("dykaf", {"lr": 11})
    with pytest.raises(ValueError, match="lr must be >= 0 and <= 10") as library:
        DyKAF(model.parameters(), lr=11)
    assert str(service.value) == str(library.value)
