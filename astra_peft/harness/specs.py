"""Method specs: ``METHOD[:KEY=VALUE]...`` on the command line, parsed once into a typed `MethodSpec`.

The spec string is also the run's name in tables and plots, e.g. ``astra:eigen_selection=largest``. Parsing
coerces each value to the type its option is annotated with (a `Literal` alias gives the allowed choices, see
astra_peft/config.py) and builds the method's own config once, so a bad value or a bad combination is refused
here, naming the spec, before any model is loaded. What flows on to `methods.build_method` is the typed spec.
"""

from __future__ import annotations

import dataclasses
import math
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
    options: dict = field(default_factory=dict)  # method's own options (config and run options), coerced
    overrides: dict = field(default_factory=dict)  # lr / rank / alpha
    calibration: dict = field(default_factory=dict)  # calibration_samples / calibration_data

    @property
    def slug(self) -> str:
        """File-system-safe name for the run directory ("astra:eigen_selection=largest" → "astra-eigen_selection=largest")."""
        return self.name.replace(":", "-").replace("/", "_").replace(" ", "")

    def method_config(self, **defaults) -> Any:
        """A fresh instance of the method's config class (e.g. `AstraConfig`) from the spec's options.

        Args:
            **defaults: Values for options the spec leaves unset (e.g. the run's seed); the spec's own win.

        Returns:
            The config object, or None for a method without a config class.

        Raises:
            ValueError: The config class refuses the combination (only possible through `defaults`: the
                spec's own options were checked by `parse_method_spec`).
        """
        cls = METHODS[self.method].config_cls
        if cls is None:
            return None
        own = {k: v for k, v in self.options.items() if k not in _run_option_names(self.method)}
        return cls(**{**defaults, **own})

    def run_options(self) -> Any:
        """The method's harness-side options (e.g. Astra's ``rank_allocation``) from the spec, defaults elsewhere.

        Returns:
            An instance of the method's `run_options` dataclass, or None for a method without one.

        Raises:
            ValueError: A value outside its choices (only possible when the spec was built without parsing).
        """
        cls = METHODS[self.method].run_options
        if cls is None:
            return None
        return cls(**{k: v for k, v in self.options.items() if k in _run_option_names(self.method)})

    def with_defaults(self, **defaults) -> "MethodSpec":
        """Fill options the spec does not set (e.g. from --eigen-selection); the spec wins over flags.

        Args:
            **defaults: Option values as given on the command line; None means "not given".

        Returns:
            This spec when nothing applies, else the spec with ``:KEY=VALUE`` appended for each default that
            the method accepts and the spec leaves unset (so the run's name shows it).

        Raises:
            ValueError: A default is not a valid value for its option.
        """
        parts = [self.name]
        for key, value in defaults.items():
            if value is None or key in self.options or key in self.calibration or key in self.overrides:
                continue
            if key not in METHODS[self.method].option_types():
                continue
            parts.append(f"{key}={value}")
        return parse_method_spec(":".join(parts)) if len(parts) > 1 else self


def _run_option_names(method: str) -> set[str]:
    cls = METHODS[method].run_options
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set()


def _coerce(key: str, raw: str, hint: Any, spec: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if raw.lower() == "none" and (hint is type(None) or type(None) in args):
        return None
    if origin is typing.Union or origin is types.UnionType:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    method = spec.split(":", 1)[0]
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
            value = float(raw)
            if not math.isfinite(value):
                # float() accepts "nan" and "inf"; no option of any method means either, and a NaN learning
                # rate or alpha trains to a NaN model with exit code 0.
                raise ValueError("expected a finite number")
            return value
    except ValueError as err:
        raise ValueError(f"in method spec {spec!r}: method {method!r}: bad value {raw!r} for {key}: {err}") from None
    return raw


def parse_method_spec(spec: str) -> MethodSpec:
    """Parse ``METHOD[:KEY=VALUE]...`` into a typed `MethodSpec`.

    Args:
        spec: The spec text, e.g. ``astra:eigen_selection=largest:lr=2e-4``. Whitespace is ignored.

    Returns:
        The spec, its values coerced to their options' types and checked by the method's config class.

    Raises:
        ValueError: Unknown method, unknown option, malformed pair, a value of the wrong type or outside its
            choices, a non-finite number, or a combination the method's config refuses; the message names the
            spec and what would be right.
    """
    text = "".join(spec.split())
    method, *pairs = text.split(":")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    option_types = METHODS[method].option_types()
    options, overrides, calibration = {}, {}, {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.replace("-", "_")
        if not sep or not key or not raw:
            raise ValueError(f"in method spec {spec!r}: expected KEY=VALUE after ':', got {pair!r}")
        if key not in option_types:
            raise ValueError(
                f"method {method!r} has no option {key!r}; it accepts: {', '.join(sorted(option_types))}"
            )
        value = _coerce(key, raw, option_types[key], text)
        if key in COMMON_OPTIONS:
            overrides[key] = value
        elif key in CALIBRATION_OPTIONS:
            calibration[key] = value
        else:
            options[key] = value
    parsed = MethodSpec(name=text, method=method, options=options, overrides=overrides, calibration=calibration)
    if options:  # the method's own checks (e.g. AstraConfig's combinations), once, here
        try:
            parsed.method_config()
            parsed.run_options()
        except (TypeError, ValueError) as err:
            raise ValueError(f"in method spec {text!r}: {err}") from None
    return parsed


def parse_method_list(text: str) -> list[MethodSpec]:
    """Parse comma-separated specs (``astra,lora:lr=1e-3``).

    Args:
        text: The comma-separated list.

    Returns:
        The parsed specs, in order.

    Raises:
        ValueError: A spec is invalid, one is listed twice, or the list is empty.
    """
    specs = [parse_method_spec(s) for s in text.split(",") if s.strip()]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice in {text!r}")
    if not specs:
        raise ValueError("no method given")
    return specs
