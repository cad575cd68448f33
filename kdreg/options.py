"""Checking a plugin factory's recipe options against its signature, before calling it."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kdreg.convert import converter, error_lines
from kdreg.errors import OptionError, RecipeError


class StageRef(str):
    """Annotation for a factory option that names an earlier stage of the recipe.

    The recipe writes the stage's name (or, annotated ``list[StageRef]``, a list of names). A
    backbone factory receives a trainable copy of that stage's trained backbone; a graph or bridge
    factory receives a :class:`kdreg.TeacherStage` (the stage's name and its frozen model).
    """


def accepted_options(factory: Callable[..., Any], provided: Mapping[str, Any] = {}) -> dict[str, inspect.Parameter]:
    """The recipe options ``factory`` takes: its keyword parameters less those kdreg provides."""
    params = inspect.signature(factory).parameters
    return {
        n: p for n, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in provided
    }


def stage_refs(factory: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """``{option: stage name(s)}`` for the options annotated as :class:`StageRef` (or a list of
    them) that the recipe gives as names."""
    hints = _hints(factory)
    out: dict[str, str | list[str]] = {}
    for key, value in options.items():
        if not _mentions_stageref(hints.get(key)):
            continue
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[key] = list(value)
    return out


def bind(
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    provided: Mapping[str, Any],
    path: str,
    what: str,
) -> dict[str, Any]:
    """Keyword arguments for ``factory``: ``options`` checked by name and type, plus ``provided``.

    Raises :class:`RecipeError` with one ``what @ path.key`` line per problem.
    """
    sig = inspect.signature(factory)
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = accepted_options(factory, provided)
    hints = _hints(factory)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in accepted and not var_kw:
            names = ", ".join(accepted) or "none"
            problems.append(f"unknown option {key!r} for {what}; accepted: {names} @ {path}.{key}")
            continue
        hint = hints.get(key, Any)
        try:
            kwargs[key] = _structure(value, hint)
        except Exception as exc:  # noqa: BLE001 - reported as a recipe problem
            problems.extend(error_lines(exc, f"{path}.{key}"))
    for name, p in accepted.items():
        if p.default is p.empty and name not in options:
            problems.append(f"required option {name!r} of {what} missing @ {path}.{name}")
    if problems:
        raise RecipeError(problems)
    for name, value in provided.items():
        if name in params or var_kw:
            kwargs[name] = value
    return kwargs


def call(factory: Callable[..., Any], kwargs: Mapping[str, Any], *, path: str) -> Any:
    """Call ``factory``; an :class:`OptionError` or ``ValueError`` becomes a recipe problem."""
    try:
        return factory(**kwargs)
    except OptionError as exc:
        raise RecipeError([f"{e} @ {path}.{e.key}" if e.key else f"{e} @ {path}"
                           for e in exc.each()]) from None
    except (ValueError, TypeError) as exc:
        raise RecipeError([f"{exc} @ {path}"]) from None


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable annotations are not checked
        return {}


def _mentions_stageref(hint: Any) -> bool:
    if hint is StageRef:
        return True
    return any(_mentions_stageref(a) for a in typing.get_args(hint))


def _structure(value: Any, hint: Any) -> Any:
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if hint is StageRef:
        if isinstance(value, (int, float, bool, list, dict)) or value is None:
            raise TypeError(f"expected the name of an earlier stage, got {value!r}")
        return value  # a name, or (from Python) the resolved object itself
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _structure(value, arg)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise TypeError(f"expected {names}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (list, Sequence, Iterable) or hint in (list, Sequence, Iterable):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        if not args:
            return list(value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_structure(v, args[0]))
            except Exception as exc:  # noqa: BLE001
                raise TypeError(f"item {i}: {exc}") from None
        return out
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if isinstance(hint, type) and hint not in (int, float, str, bool) and isinstance(value, hint):
        return value  # an object given from Python, e.g. a backbone instance
    return converter.structure(value, hint)
