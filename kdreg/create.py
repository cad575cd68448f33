"""The one path from a registered name and its options to a built object, for every registry kind.

``create(kind, name, options, ...)`` looks the name up, binds and type-checks the options against
the factory's signature, resolves options that name earlier recipe stages, calls the factory and
checks what it returned. The Python API, the engine's assembly and data loading all use it, so a
problem reads the same wherever it is found: one ``what @ path.key`` line each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kdreg.backbone import FlexibleBackbone, backbone_problems
from kdreg.bridge import Bridge
from kdreg.divergence import Divergence, divergence_problems
from kdreg.errors import RecipeError, UserError
from kdreg.feature_loss import FeatureLoss, feature_loss_problems
from kdreg.graph import TeacherGraph
from kdreg.options import bind, call, stage_refs
from kdreg.registry import KINDS, Registry, UnknownNameError, get_registry

#: ``refs(option, stage_name)``: the value a factory gets for an option naming an earlier stage.
Resolver = Callable[[str, str], Any]


def create(
    kind: str,
    name: str,
    options: Mapping[str, Any],
    *,
    provided: Mapping[str, Any],
    path: str,
    refs: Resolver | None = None,
    registry: Registry | None = None,
    name_key: str | None = None,
    result: tuple[str, Callable[[Any, str], Any]] | None = None,
) -> Any:
    """Build the registered ``kind`` called ``name`` from ``options`` plus the ``provided`` values.

    ``path`` is the recipe key of the table (``recipe.stages.student.graph``); ``refs`` resolves
    options annotated as :class:`kdreg.StageRef` (without it, as from Python, the factory gets the
    names as given); ``name_key`` is the key of the name (default ``path.name``); ``result`` is
    (what the factory must return, its check) for a kind without one in :data:`RESULTS` (the data
    layer checks its own sources: a malformed one raises :class:`kdreg.errors.DataError`).
    Raises :class:`kdreg.errors.RecipeError` (or :class:`UnknownNameError`) with one line per
    problem.
    """
    registry = registry or get_registry(kind)
    name_key = name_key or f"{path}.name"
    if name not in registry:
        raise UnknownNameError([f"{registry.unknown_message(name)} @ {name_key}"])
    entry = registry.get(name)
    kwargs = bind(entry.factory, options, provided=provided, path=path, what=f"{kind} {name!r}")
    if refs is not None:
        _resolve(kwargs, stage_refs(entry.factory, options), refs)
    built = call(entry.factory, kwargs, path=path)
    expected, check = result or RESULTS[kind]
    who = f"{kind} {name!r} of plugin {entry.plugin!r} ({entry.distribution})"
    try:
        return check(built, name)
    except TypeError:
        raise RecipeError([f"{who} returned {type(built).__name__}, not {expected} "
                           f"@ {name_key}"]) from None
    except IncompleteResult as exc:
        raise RecipeError([f"{who} returned a {type(built).__name__} that breaks the contract of "
                           f"{KINDS[kind]}: {problem} @ {name_key}" for problem in exc.problems]) from None


def _resolve(kwargs: dict[str, Any], names: Mapping[str, str | list[str]], refs: Resolver) -> None:
    """Replace the stage names in ``kwargs`` by what ``refs`` makes of them."""
    problems: list[str] = []
    unresolved = False
    for key, ref in names.items():
        try:
            kwargs[key] = [refs(key, r) for r in ref] if isinstance(ref, list) else refs(key, ref)
        except UserError as exc:
            problems += exc.problems  # may be empty: the named stage's own problems are reported
            unresolved = True
    if problems or unresolved:
        raise RecipeError(problems)


class IncompleteResult(Exception):
    """A factory's result is of the right type but lacks what its hook spec asks for."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _instance_of(cls: type, contract: Callable[[Any], list[str]] | None = None
                 ) -> Callable[[Any, str], Any]:
    """The check of a built object: an instance of ``cls`` (else TypeError) whose ``contract``
    finds no problem (else :class:`IncompleteResult`)."""
    def check(obj: Any, name: str) -> Any:
        if not isinstance(obj, cls):
            raise TypeError(name)
        problems = contract(obj) if contract is not None else []
        if problems:
            raise IncompleteResult(problems)
        return obj

    return check


#: kind -> (what its factories must return, the check of a built object); a check raises
#: TypeError for a wrong type and :class:`IncompleteResult` for a broken contract
RESULTS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "backbone": ("a kdreg.FlexibleBackbone (an nn.Module)",
                 _instance_of(FlexibleBackbone, backbone_problems)),
    "graph": ("a kdreg.TeacherGraph", _instance_of(TeacherGraph)),
    "bridge": ("a kdreg.Bridge", _instance_of(Bridge)),
    "divergence": ("a kdreg.divergence.Divergence", _instance_of(Divergence, divergence_problems)),
    "feature_loss": ("a kdreg.feature_loss.FeatureLoss (an nn.Module)",
                     _instance_of(FeatureLoss, feature_loss_problems)),
}
