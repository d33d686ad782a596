"""Method specs: ``METHOD[:KEY=VALUE]...`` on the command line, parsed and checked against the method registry.

The spec string is also the run's name in tables and plots, e.g. ``astra:eigen_selection=largest``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .methods import CALIBRATION_OPTIONS, COMMON_OPTIONS, METHODS


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``METHOD[:KEY=VALUE]...``. `name` is the spec as written (minus whitespace): the run's label."""

    name: str
    method: str
    options: dict = field(default_factory=dict)  # method's own options, coerced
    overrides: dict = field(default_factory=dict)  # lr / rank / alpha
    calibration: dict = field(default_factory=dict)  # calibration_samples / calibration_data

    @property
    def slug(self) -> str:
        """File-system-safe name for the run directory ("astra:eigen_selection=largest" → "astra-eigen_selection=largest")."""
        return self.name.replace(":", "-").replace("/", "_").replace(" ", "")

    def with_defaults(self, **defaults) -> "MethodSpec":
        """Fill options the spec does not set (e.g. from --eigen-selection); the spec wins over flags."""
        parts = [self.name]
        for key, value in defaults.items():
            if value is None or key in self.options or key in self.calibration or key in self.overrides:
                continue
            if key not in METHODS[self.method].option_types():
                continue
            parts.append(f"{key}={value}")
        return parse_method_spec(":".join(parts)) if len(parts) > 1 else self


def _coerce(key: str, raw: str, hint: Any, method: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if raw.lower() == "none" and (hint is type(None) or type(None) in args):
        return None
    if origin is typing.Union or origin is types.UnionType:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is typing.Literal:
            if raw not in [str(a) for a in args]:
                raise ValueError(f"choose one of {', '.join(map(str, args))}")
            return next(a for a in args if str(a) == raw)
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError as err:
        raise ValueError(f"method {method!r}: bad value {raw!r} for {key}: {err}") from None
    return raw


def parse_method_spec(spec: str) -> MethodSpec:
    """Parse ``METHOD[:KEY=VALUE]...``; raise ValueError naming what is wrong and what would be right."""
    text = "".join(spec.split())
    method, *pairs = text.split(":")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    types = METHODS[method].option_types()
    options, overrides, calibration = {}, {}, {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.replace("-", "_")
        if not sep or not key or not raw:
            raise ValueError(f"in method spec {spec!r}: expected KEY=VALUE after ':', got {pair!r}")
        if key not in types:
            raise ValueError(
                f"method {method!r} has no option {key!r}; it accepts: {', '.join(sorted(types))}"
            )
        value = _coerce(key, raw, types[key], method)
        if key in COMMON_OPTIONS:
            overrides[key] = value
        elif key in CALIBRATION_OPTIONS:
            calibration[key] = value
        else:
            options[key] = value
    return MethodSpec(name=text, method=method, options=options, overrides=overrides, calibration=calibration)


def parse_method_list(text: str) -> list[MethodSpec]:
    specs = [parse_method_spec(s) for s in text.split(",") if s.strip()]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice in {text!r}")
    if not specs:
        raise ValueError("no method given")
    return specs
