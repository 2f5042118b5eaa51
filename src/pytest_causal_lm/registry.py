"""The invariant registry: one declaration per invariant.

The suite's tests, the ``-m`` markers, the verdict columns and legend, the
architecture sweep and the docs' table are all derived from it, so a new
invariant is a check function plus one ``register_invariant`` call. The
built-in declarations live in ``builtin.py``. Importing this module does not
import torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from . import checks
from .checks._common import CheckResult, error_failure, measured_of

if TYPE_CHECKING:
    from .loading import CausalLM
    from .session import CausalLMSession

__all__ = [
    "Invariant",
    "hide_registry_frames",
    "invariant_for_test",
    "invariants",
    "markdown_table",
    "markers",
    "register_invariant",
    "show_registry_frames",
    "suite_test",
]

# The frames of the suite's test function and of the built-in glue are hidden from tracebacks, so a failing
# invariant shows the check's own message first; under --tb=long (set by the plugin) they show.
_SHOW_REGISTRY_FRAMES = [False]


def show_registry_frames(show: bool) -> None:
    """Show (``--tb=long``) or hide the registry's frames in tracebacks."""
    _SHOW_REGISTRY_FRAMES[0] = show


def hide_registry_frames(excinfo: object) -> bool:
    """A module-level ``__tracebackhide__``: pytest reads it from a frame's globals too."""
    return not _SHOW_REGISTRY_FRAMES[0]


__tracebackhide__ = hide_registry_frames

# What the derived ``run`` passes to a helper that takes it, from the loaded checkpoint.
_STANDARD_ARGUMENTS: dict[str, Callable[[CausalLM], Any]] = {
    "tolerance": lambda lm: lm.tolerance,
    "seed": lambda lm: lm.seed,
}


@dataclass(frozen=True)
class Invariant:
    """One invariant of the built-in suite.

    ``helper`` names the public ``assert_*`` function in ``pytest_causal_lm.checks`` that checks it. Without
    ``run``, the suite calls ``helper(model, tokenizer)`` plus the ``tolerance`` and ``seed`` it declares; a
    ``run(causal_lm, **fixtures)`` of its own is for helpers that need more (then it calls ``helper``), and
    for invariants a plugin or conftest checks with code of its own.
    Either raises AssertionError (ideally one made by ``checks._common.failure``, which carries figures) or
    skips, and may return a CheckResult for the reports. ``fixtures`` are resolved, in order, before the model
    loads. ``opt_in(session)`` returns why the invariant is off in this session (then it skips), or None.
    ``healthy_skips`` are regexes of the skip reasons a healthy checkpoint may give.
    """

    key: str
    name: str
    column: str
    marker: str
    summary: str
    run: Callable[..., CheckResult | None] | None = None
    helper: str = ""  # the public helper in pytest_causal_lm.checks it runs (required without ``run``)
    fixtures: tuple[str, ...] = ()
    opt_in: Callable[[CausalLMSession], str | None] | None = None
    healthy_skips: tuple[str, ...] = ()

    @property
    def test_name(self) -> str:
        return f"test_{self.key}"

    @property
    def marker_name(self) -> str:
        return f"causal_lm_{self.marker}"

    def check(self, lm: CausalLM, **fixtures: Any) -> CheckResult | None:
        """Run the invariant on a loaded checkpoint: its own ``run``, or its helper with the standard arguments."""
        if self.run is not None:
            return self.run(lm, **fixtures)
        helper = getattr(checks, self.helper)
        accepted = inspect.signature(helper).parameters
        kwargs = {name: value(lm) for name, value in _STANDARD_ARGUMENTS.items() if name in accepted}
        return helper(lm.model, lm.tokenizer, **kwargs)


_REGISTRY: dict[str, Invariant] = {}


def register_invariant(invariant: Invariant, *, replace: bool = False) -> Invariant:
    """Add ``invariant`` to the suite (call it from a plugin or conftest, before collection)."""
    if len(invariant.column) > 4:
        raise ValueError(f"invariant {invariant.key!r}: column {invariant.column!r} is longer than 4 characters")
    clash = next((i for i in _REGISTRY.values() if i.column == invariant.column and i.key != invariant.key), None)
    if clash is not None:
        raise ValueError(f"invariant {invariant.key!r}: column {invariant.column!r} is taken by {clash.key!r}")
    if invariant.key in _REGISTRY and not replace:
        raise ValueError(f"invariant {invariant.key!r} is already registered (pass replace=True to redefine it)")
    if invariant.run is None and invariant.helper not in checks.__all__:  # by name: importing it waits for a run
        raise ValueError(
            f"invariant {invariant.key!r}: pytest_causal_lm.checks has no helper {invariant.helper!r}; "
            "name one, or give the invariant a run of its own"
        )
    _REGISTRY[invariant.key] = invariant
    return invariant


def invariants() -> tuple[Invariant, ...]:
    """Every registered invariant, in report order."""
    return tuple(_REGISTRY.values())


def invariant_for_test(test_name: str) -> Invariant | None:
    return next((i for i in _REGISTRY.values() if i.test_name == test_name), None)


def markers() -> dict[str, str]:
    """``marker -> help``: one marker per family, named after its invariants."""
    families: dict[str, list[str]] = {}
    for invariant in _REGISTRY.values():
        families.setdefault(invariant.marker_name, []).append(invariant.name)
    return {marker: "causal LM invariant: " + ", ".join(names) for marker, names in families.items()}


def markdown_table() -> str:
    """The docs' table of invariants."""
    rows = ["| test | helper | what it checks | marker | column |", "|---|---|---|---|---|"]
    for i in _REGISTRY.values():
        opt_in = " (opt-in)" if i.opt_in else ""
        helper = f"`{i.helper}`" if i.helper else ""
        rows.append(f"| `{i.test_name}` | {helper} | {i.summary}{opt_in} | `{i.marker_name}` | `{i.column}` |")
    return "\n".join(rows)


def suite_test(invariant: Invariant) -> Callable[..., None]:
    """The built-in suite's test function for ``invariant``, with its markers.

    Its fixtures are the invariant's own, then ``causal_lm`` (so a reference is computed and
    freed before the candidate loads), then ``record_property``; opt-in skips are applied at collection.
    """

    def test(**fixtures: Any) -> None:
        extras = {name: fixtures[name] for name in invariant.fixtures}
        try:
            try:
                result = invariant.check(fixtures["causal_lm"], **extras)
            except (AssertionError, MemoryError):
                raise
            except Exception as exc:  # an error on the checked path is that path's failure, said in one message
                raise error_failure(exc, fixtures["causal_lm"].model, invariant.name) from None
        except AssertionError as exc:
            fixtures["record_property"]("causal_lm", {"invariant": invariant.name, **(measured_of(exc) or {})})
            if _SHOW_REGISTRY_FRAMES[0]:
                raise
            # the check's own frames (and the model's repr among their arguments) only under --tb=long: every
            # failure, of every helper and of every frame inside it, leads with its message
            raise exc.with_traceback(None) from None
        if result is not None:
            fixtures["record_property"]("causal_lm", result.as_dict())

    names = (*invariant.fixtures, "causal_lm", "record_property")
    test.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    )
    test.__name__ = test.__qualname__ = invariant.test_name
    test.__doc__ = invariant.summary
    test = pytest.mark.causal_lm(test)
    return getattr(pytest.mark, invariant.marker_name)(test)
