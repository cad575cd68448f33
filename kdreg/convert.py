"""kdreg's one strict cattrs converter, shared by the recipe and by plugin options.

Strict means: no silent coercion. ``1.5`` is not an int, ``"3"`` is not a number, ``1`` is not a
bool, and unknown keys of a table are errors.
"""

from __future__ import annotations

import typing
from typing import Any

import attrs
import cattrs


def _strict(kind: type, accepts: tuple[type, ...], name: str):
    def structure(value: Any, _: type) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {name}, got {type(value).__name__} {value!r}")
        return kind(value)

    return structure


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, (int,), "an integer"))
    conv.register_structure_hook(float, _strict(float, (int, float), "a number"))
    conv.register_structure_hook(str, _strict(str, (str,), "a string"))
    conv.register_structure_hook(bool, _strict(bool, (bool,), "true or false"))

    def strict_tuple(value: Any, tp: Any) -> Any:
        # a string or table is not a list (cattrs would iterate it: "bias" -> b, i, a, s)
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
        return conv._structure_tuple(value, tp)  # per-item checks, with the item's index

    conv.register_structure_hook_func(lambda tp: typing.get_origin(tp) is tuple, strict_tuple)
    return conv


converter = make_converter()


def error_lines(exc: BaseException, path: str) -> list[str]:
    """cattrs' detailed errors as ``what @ path.to.key`` lines."""
    if isinstance(exc, cattrs.BaseValidationError):
        return list(cattrs.transform_error(exc, path=path, format_exception=_format))
    return [f"{_format(exc, None)} @ {path}"]


def _format(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, TypeError | ValueError | AttributeError) and not str(exc).startswith("expected"):
        if type_ is not None and attrs.has(type_):
            return "expected a table"
        if typing.get_origin(type_) in (tuple, list):
            return "expected a list"
    if isinstance(exc, TypeError | ValueError) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if type_ is None else cattrs.v.format_exception(exc, type_)
