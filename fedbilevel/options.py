"""Run-config options, declared once by the component that uses them.

A component (LoRA, the data loaders, a strategy, ...) is a frozen dataclass whose fields
are declared with :func:`option`: the run-config key, the default, a one-line help and a
check, in one place (peft's ``LoraConfig`` style). Checks of several fields go in the
component's ``__post_init__`` and raise :class:`ConfigError`. :class:`fedbilevel.config.RunConfig`
composes the components; the schema, pyproject's defaults and the README's key table are
derived from (or tested against) these declarations.

Every failed check is one line naming the key, the value and what is allowed. Pure Python:
no torch, no Flower.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """A run-config value that is not allowed (message: one line with key, value, allowed)."""


def not_allowed(key: str, value: Any, expected: str) -> ConfigError:
    """The one-line error for ``key`` holding ``value``; ``expected`` says what is allowed."""
    return ConfigError(f"run-config key '{key}': value {value!r} is not allowed; {expected}")


def option(key: str, default: Any, check: Check, help: str) -> Any:  # noqa: A002 (peft's name for it)
    """A dataclass field that is the run-config key ``key``.

    Parameters
    ----------
    key : str
        The kebab-case run-config key.
    default : Any
        The default, in the field's type (a tuple for a comma-separated list).
    check : callable
        ``(key, raw value) -> value``: validates a run-config value and converts it to the
        field's type; raises :class:`ConfigError`.
    help : str
        One line for the README's key table.
    """
    return dataclasses.field(default=default, metadata={"key": key, "check": check, "help": help})


def declared(component: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(run-config key, field) of every option a component declares, in declaration order."""
    for field in dataclasses.fields(component):
        if "key" in field.metadata:
            yield field.metadata["key"], field


def from_run_config(component: type, values: Mapping[str, Any], **extra: Any) -> Any:
    """The component built from a flat run config: each declared key checked and converted."""
    fields = {field.name: field.metadata["check"](key, values[key]) for key, field in declared(component)}
    return component(**fields, **extra)


def to_run_config(instance: Any) -> dict[str, Any]:
    """A component back to its flat run-config keys (tuples as comma-separated text)."""
    out = {}
    for key, field in declared(type(instance)):
        value = getattr(instance, field.name)
        out[key] = ",".join(value) if isinstance(value, tuple) else value
    return out


def validate(instance: Any) -> None:
    """Check (and convert) every declared field of a component in place; for ``__post_init__``,
    so that a component built in code is held to the same rules as one from a run config."""
    for key, field in declared(type(instance)):
        object.__setattr__(instance, field.name, field.metadata["check"](key, getattr(instance, field.name)))


def default_run_config(component: type) -> dict[str, Any]:
    """The declared defaults of a component, as run-config values."""
    out = {}
    for key, field in declared(component):
        out[key] = ",".join(field.default) if isinstance(field.default, tuple) else field.default
    return out


# ---------------------------------------------------------------------------- checks


def integer(low: int, high: int | None = None) -> Check:
    """An integer in [low, high] (no upper bound when ``high`` is None); booleans are refused."""

    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise not_allowed(key, value, f"expected an integer ≥ {low}" if high is None else f"expected an integer in [{low}, {high}]")
        return value

    return check


def number(low: float, *, low_open: bool, high: float | None = None, high_open: bool = True) -> Check:
    """A finite number in the interval from ``low`` to ``high`` (open or closed at each end)."""

    def check(key: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            left = "(" if low_open else "["
            right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
            raise not_allowed(key, value, f"expected a number in {left}{low}, {right}")
        return float(value)

    return check


def choice(allowed: tuple[str, ...]) -> Check:
    """One of ``allowed``."""

    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise not_allowed(key, value, f"choose one of {', '.join(allowed)}")
        return value

    return check


def boolean(key: str, value: Any) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise not_allowed(key, value, "expected true or false")
    return value


def text(*, empty_ok: bool) -> Check:
    """A string (non-blank unless ``empty_ok``)."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or (not empty_ok and not value.strip()):
            raise not_allowed(key, value, "expected a non-empty string")
        return value

    return check


def name_list(key: str, value: Any) -> tuple[str, ...]:
    """Distinct comma-separated names, e.g. ``'q_proj,v_proj'`` -> ("q_proj", "v_proj")."""
    if isinstance(value, str):
        names = tuple(part.strip() for part in value.split(","))
    elif isinstance(value, (tuple, list)) and all(isinstance(part, str) for part in value):
        names = tuple(value)
    else:
        names = ()
    if not names or not all(names) or len(set(names)) != len(names):
        raise not_allowed(key, value, "expected distinct comma-separated names, e.g. 'q_proj,v_proj'")
    return names


def device(key: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
        raise not_allowed(key, value, "expected auto, cpu, cuda or cuda:N")
    return value
