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
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """A run-config value that is not allowed (message: one line with key, value, allowed)."""


def not_allowed(key: str, value: Any, expected: str) -> ConfigError:
    """The one-line error for ``key`` holding ``value``; ``expected`` says what is allowed."""
    return ConfigError(f"run-config key '{key}': value {value!r} is not allowed; {expected}")


def option(key: str, default: Any, check: Check, help: str) -> Any:
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


def component(cls: type) -> Any:
    """A dataclass field holding a whole component (its own options, or further components)."""
    return dataclasses.field(default_factory=cls, metadata={"component": cls})


def declared(component: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(run-config key, field) of every option a component declares, nested components included,
    in declaration order."""
    for field in dataclasses.fields(component):
        if "key" in field.metadata:
            yield field.metadata["key"], field
        elif "component" in field.metadata:
            yield from declared(field.metadata["component"])


def from_run_config(component: type, values: Mapping[str, Any]) -> Any:
    """The component built from a flat run config: each declared key checked and converted,
    nested components built the same way (their ``__post_init__`` checks run inside out)."""
    fields = {}
    for field in dataclasses.fields(component):
        if "key" in field.metadata:
            fields[field.name] = field.metadata["check"](field.metadata["key"], values[field.metadata["key"]])
        elif "component" in field.metadata:
            fields[field.name] = from_run_config(field.metadata["component"], values)
    return component(**fields)


def to_run_config(instance: Any) -> dict[str, Any]:
    """A component back to its flat run-config keys (tuples as comma-separated text)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if "key" in field.metadata:
            out[field.metadata["key"]] = ",".join(value) if isinstance(value, tuple) else value
        elif "component" in field.metadata:
            out.update(to_run_config(value))
    return out


def validate(instance: Any) -> None:
    """Check (and convert) every option field of a component in place; for ``__post_init__``,
    so that a component built in code is held to the same rules as one from a run config."""
    for field in dataclasses.fields(instance):
        if "key" in field.metadata:
            value = field.metadata["check"](field.metadata["key"], getattr(instance, field.name))
            object.__setattr__(instance, field.name, value)


def defaults(component: type) -> dict[str, Any]:
    """The declared defaults of a component (nested ones included), as run-config values."""
    out = {}
    for key, field in declared(component):
        out[key] = ",".join(field.default) if isinstance(field.default, tuple) else field.default
    return out


# ---------------------------------------------------------------------------- checks


def integer(low: int, high: int | None = None) -> Check:
    """An integer in [low, high] (no upper bound when ``high`` is None); booleans are refused."""

    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise not_allowed(
                key,
                value,
                f"expected an integer ≥ {low}" if high is None else f"expected an integer in [{low}, {high}]",
            )
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


def choice(allowed: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Check:
    """One of ``allowed`` (or of what ``allowed()`` returns when checked: a registry that may grow)."""

    def check(key: str, value: Any) -> str:
        options = allowed() if callable(allowed) else allowed
        if value not in options:
            raise not_allowed(key, value, f"choose one of {', '.join(options)}")
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


def resolve_user_path(path: str) -> Path:
    """A path from the run config: relative ones are taken relative to ``$FEDBILEVEL_OUTPUT_ROOT``
    when set (scripts/flwr_run.sh sets it to the project folder: under ``flwr run`` the apps run
    from a copy of the project elsewhere), else to the working directory."""
    return (Path(os.environ.get("FEDBILEVEL_OUTPUT_ROOT", ".")) / Path(path).expanduser()).resolve()
