"""Optimizer hyperparameters as small validated dataclasses, and the schema derived from them.

Every optimizer the library builds has one frozen config dataclass (:class:`dykaf.options.DyKAFConfig`,
the baselines' in :mod:`dykaf.baselines.configs`). Each field says everything about one
hyperparameter, once:

* its type annotation gives the kind — ``float`` a number, ``int`` an integer, ``bool`` a boolean, a
  ``Literal[...]`` one of its strings, ``X | None`` a value that may also be null;
* its metadata (set with :func:`hyperparameter`) gives the help text and the accepted range.

``__post_init__`` checks every field against exactly that, and :meth:`OptimizerConfig.schema` serves
the same facts as JSON (type, default, range, help) to the REST API and the dashboard's form, so the
range a person reads is the range that is enforced: there is one validator and one set of ranges.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal, Self

_METADATA_KEY = "dykaf.hyperparameter"
_KINDS: dict[type, str] = {float: "number", int: "integer", bool: "boolean"}


class HyperparameterError(ValueError):
    """A value outside what a hyperparameter accepts; the message names the field and its range."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(f"{name} must be {requirement}, got {value!r}")

    def renamed(self, aliases: Mapping[str, str]) -> HyperparameterError:
        """The same error under the caller's name for the field (``beta1`` given as ``betas[0]``)."""
        return HyperparameterError(aliases.get(self.name, self.name), self.requirement, self.value)


@dataclass(frozen=True)
class _Meta:
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    log_scale: bool = False


def hyperparameter(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    log_scale: bool = False,
) -> Any:
    """A config field: its default, a one-line help text (no measured figures: they go stale) and,
    for numbers, the accepted range. ``log_scale`` tells the dashboard to sweep it geometrically."""
    meta = _Meta(help, minimum, maximum, exclusive_minimum, exclusive_maximum, log_scale)
    return field(default=default, metadata={_METADATA_KEY: meta})


# The kinds of hyperparameter several optimizers share, so they share one range too.
def learning_rate(default: float) -> Any:
    """``[0, 10]``: 0 freezes the weights (a control); the cap catches unit slips such as 3e3 for 3e-3."""
    return hyperparameter(default, "learning rate", minimum=0, maximum=10, log_scale=True)


def decay(default: float | None, help: str) -> Any:
    """An exponential-moving-average decay (β, momentum) in ``[0, 1)``."""
    return hyperparameter(default, help, minimum=0, exclusive_maximum=1)


def decoupled_weight_decay(default: float, help: str = "decoupled weight decay") -> Any:
    """In ``[0, 1]``: the step shrinks weights by ``lr·wd``, so a decay above 1 is a slip."""
    return hyperparameter(default, help, minimum=0, maximum=1)


def epsilon(default: float, help: str = "Adam's epsilon") -> Any:
    return hyperparameter(default, help, exclusive_minimum=0, maximum=1, log_scale=True)


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter's schema entry (JSON-schema-like, rendered by the dashboard) and its check."""

    type: str  # "number" | "integer" | "boolean" | "string"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    enum: tuple[str, ...] | None = None
    log_scale: bool = False
    nullable: bool = False

    @classmethod
    def of_field(cls, config_field: Field[Any], annotation: Any) -> Hyperparameter:
        """The entry a config field declares through its annotation and :func:`hyperparameter`."""
        meta = config_field.metadata.get(_METADATA_KEY)
        if meta is None or config_field.default is MISSING:
            raise TypeError(f"config field {config_field.name!r} must be declared with hyperparameter()")
        nullable = False
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            nullable = len(members) < len(typing.get_args(annotation))
            if len(members) != 1:
                raise TypeError(f"config field {config_field.name!r} has an unsupported type {annotation}")
            annotation = members[0]
        if typing.get_origin(annotation) is Literal:
            kind, enum = "string", tuple(typing.get_args(annotation))
        elif annotation in _KINDS:
            kind, enum = _KINDS[annotation], None
        else:
            raise TypeError(f"config field {config_field.name!r} has an unsupported type {annotation}")
        return cls(
            type=kind,
            default=config_field.default,
            help=meta.help,
            minimum=meta.minimum,
            maximum=meta.maximum,
            exclusive_minimum=meta.exclusive_minimum,
            exclusive_maximum=meta.exclusive_maximum,
            enum=enum,
            log_scale=meta.log_scale,
            nullable=nullable,
        )

    def as_schema(self) -> dict[str, Any]:
        schema = {k: v for k, v in asdict(self).items() if v is not None and v is not False}
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        schema["default"] = self.default
        return schema

    def check(self, name: str, value: Any) -> Any:
        """The value (ints promoted for numbers, whole floats for integers) or ``HyperparameterError``."""
        if value is None and self.nullable:
            return None
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise HyperparameterError(name, "true or false", value)
            return value
        if self.type == "string":
            if not isinstance(value, str) or value not in (self.enum or ()):
                raise HyperparameterError(name, f"one of {', '.join(map(repr, self.enum or ()))}", value)
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HyperparameterError(name, f"a {self.type}", value)
        if not math.isfinite(value):
            raise HyperparameterError(name, "a finite number", value)
        if self.type == "integer" and not float(value).is_integer():
            raise HyperparameterError(name, "an integer", value)
        value = int(value) if self.type == "integer" else float(value)
        if not self.accepts(value):
            raise HyperparameterError(name, self.range_text(), value)
        return value

    def accepts(self, value: float) -> bool:
        """Whether a finite number lies in the range."""
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.exclusive_minimum is None or value > self.exclusive_minimum)
            and (self.maximum is None or value <= self.maximum)
            and (self.exclusive_maximum is None or value < self.exclusive_maximum)
        )

    def range_text(self) -> str:
        """The range as the dashboard states it: ``>= 0 and < 1``."""
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.exclusive_minimum is not None:
            bounds.append(f"> {self.exclusive_minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        if self.exclusive_maximum is not None:
            bounds.append(f"< {self.exclusive_maximum:g}")
        return " and ".join(bounds) or "a finite number"


@functools.cache
def _hyperparameters(config: type[OptimizerConfig]) -> dict[str, Hyperparameter]:
    hints = typing.get_type_hints(config)
    return {f.name: Hyperparameter.of_field(f, hints[f.name]) for f in fields(config)}


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Base of every optimizer config: validates each field in ``__post_init__``; derives the schema.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` whose every field comes from
    :func:`hyperparameter` (or one of the shared kinds above).
    """

    def __post_init__(self) -> None:
        for name, spec in self.hyperparameters().items():
            object.__setattr__(self, name, spec.check(name, getattr(self, name)))

    @classmethod
    def hyperparameters(cls) -> dict[str, Hyperparameter]:
        """Every field's schema entry, in declaration order."""
        return _hyperparameters(cls)

    @classmethod
    def schema(cls, exclude: Collection[str] = ()) -> dict[str, dict[str, Any]]:
        """The JSON-ready schema of the fields not in ``exclude``."""
        return {name: h.as_schema() for name, h in cls.hyperparameters().items() if name not in exclude}

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, owner: str, preset: Mapping[str, Any] | None = None
    ) -> Self:
        """Validate user-given values (defaults fill the rest); ``preset`` fields are not the user's to
        set. ``ValueError`` names an unknown key and lists the accepted ones, for ``owner``."""
        preset = dict(preset or {})
        accepted = [name for name in cls.hyperparameters() if name not in preset]
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {owner}; "
                f"accepted: {', '.join(accepted)}"
            )
        return cls(**values, **preset)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
