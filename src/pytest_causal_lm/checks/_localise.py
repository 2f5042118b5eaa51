"""Where two computations of the same scores part: the first module whose output departs.

Runs only after a parity check has failed. Both sides are replayed on the failing input with a forward hook on
every module; each hook keeps the module's output (and input) at the compared positions only, a few vectors per
module, never a whole activation. The first module in execution order whose output departs while its input
still agrees is where the two computations part: the person fixing the port starts reading there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..tolerances import Tolerance

__all__ = [
    "Departure",
    "Replay",
    "Side",
    "Trace",
    "departure_rows",
    "localisation_rows",
    "locate",
    "not_located",
    "record",
    "within",
]


@dataclass(frozen=True)
class Side:
    """One way of computing the compared scores, replayable.

    ``run`` recomputes it from scratch (a prefill included); hooks record only during the ``call``-th forward of
    the model (0: the first), so a cached step is recorded without its prefill. Compared position ``p`` sits at
    index ``p - offset`` of row ``row`` of that forward's sequence. ``model``: whose modules are recorded, when
    another model than the failing one computes this side (an offloaded copy).
    """

    label: str
    run: Callable[[], Any]
    call: int = 0
    row: int = 0
    offset: int = 0
    model: Any = None


SCORES = "(the model's output)"  # the root module's output, recorded to tell whether a replay reproduced the failure


@dataclass(frozen=True)
class Replay:
    """The two sides of a failed comparison (expected first) and the positions where they were compared."""

    expected: Side
    actual: Side
    positions: tuple[int, ...]


@dataclass
class _Kept:
    cls: str
    output: Any  # (positions, features) float32, CPU
    input: Any  # the same slice of the module's first floating input, or None


@dataclass
class Trace:
    """Every recorded module output of one side, in the order the forward finished them."""

    modules: dict[str, _Kept] = field(default_factory=dict)

    def as_plain(self) -> dict[str, tuple[str, Any, Any]]:
        """``{module: (class, output, input)}``: what torch.save can hand back from another process."""
        return {name: (kept.cls, kept.output, kept.input) for name, kept in self.modules.items()}

    @classmethod
    def from_plain(cls, plain: dict[str, tuple[str, Any, Any]]) -> Trace:
        return cls({name: _Kept(*kept) for name, kept in plain.items()})


@dataclass(frozen=True)
class Departure:
    """The first module whose output departs while its input agrees, and what surrounds it."""

    name: str
    cls: str
    position: int
    index: int  # the flattened feature index of the greatest difference
    expected: float
    actual: float
    difference: float
    input_difference: float | None
    neighbours: list[tuple[str, float, bool]]  # (module, greatest difference, departs) just before and after it
    layers: list[tuple[str, float, bool]]  # the decoder layers around the first departing one
    compared: int
    share: float  # of the run's bound: 1 where the output departs beyond it, less where only amplified later


# Does an output depart from the expected one beyond ``share`` of the run's bound (1: the bound itself)?
Departs = Callable[[Any, Any, float], bool]
# A bug whose first output stays under the bound (a cache rounded to float16) is amplified by later modules
# past it, whose inputs then already differ: the search retries at finer shares, and a module's input agrees
# only when it stays under an eighth of the share its output departs by.
SHARES = (1.0, 1 / 8, 1 / 64)


def _first_tensor(values: Sequence[Any]) -> Any:
    import torch

    for value in values:
        value = value.to_tuple() if hasattr(value, "to_tuple") else value  # a ModelOutput: its first field set
        candidate = value[0] if isinstance(value, tuple | list) and value else value
        if isinstance(candidate, torch.Tensor) and candidate.is_floating_point():
            return candidate
    return None


def _slice(tensor: Any, shape: tuple[int, int] | None, side: Side, positions: Sequence[int]) -> Any:
    """The compared positions of ``tensor``, or None where it is not laid out (batch, seq, ...) like the input.
    An output that kept only the last position (``logits_to_keep=1`` in generate's prefill) gives that one."""
    if tensor is None or shape is None or tensor.dim() < 2 or tensor.shape[0] != shape[0]:
        return None
    index = [p - side.offset for p in positions]
    if tensor.shape[1] == 1 and shape[1] > 1 and index == [shape[1] - 1]:
        index = [0]
    elif tensor.shape[1] != shape[1]:
        return None
    if min(index) < 0 or max(index) >= tensor.shape[1] or side.row >= shape[0]:
        return None
    return tensor[side.row, index].detach().float().cpu().reshape(len(index), -1)


def record(side: Side, model: Any, positions: Sequence[int]) -> Trace:
    """Replay ``side`` with every module of its model hooked; keep each module's slice at ``positions``."""
    import torch

    recorded = side.model if side.model is not None else model
    trace, state = Trace(), {"calls": -1, "shape": None}
    calls: dict[str, int] = {}

    def keep(name: str, module: Any, given: Any, output: Any) -> None:
        if state["calls"] != side.call:
            return
        out = _slice(_first_tensor([output]), state["shape"], side, positions)
        if out is not None:
            calls[name] = calls.get(name, 0) + 1  # a module run twice in one forward (a looped block) is kept twice
            key = name if calls[name] == 1 else f"{name} (call {calls[name]})"
            trace.modules[key] = _Kept(type(module).__name__, out, _slice(given, state["shape"], side, positions))

    def hook(name: str) -> Callable[..., None]:
        def after(module: Any, args: Any, kwargs: dict, output: Any) -> None:
            keep(name, module, _first_tensor([*args, kwargs.get("hidden_states"), *kwargs.values()]), output)

        return after

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in recorded.named_modules() if n]
    try:
        with _counting_forwards(recorded, state, keep), torch.no_grad():
            side.run()
    finally:
        for handle in handles:
            handle.remove()
    return trace


@contextmanager
def _counting_forwards(model: Any, state: dict, keep: Callable[..., None]) -> Iterator[None]:
    """Count the model's forwards, note each one's (batch, seq), and keep its scores. ``forward`` itself is wrapped,
    not hooked: ``generate`` may call ``model.forward`` directly, which runs no hook of the model's own."""
    import torch

    own = "forward" in vars(model)  # an instance-level forward (accelerate's hooks, a port's patch) is put back
    inner = model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        state["calls"] += 1
        given = kwargs.get("input_ids", args[0] if args else None)
        given = given if isinstance(given, torch.Tensor) else kwargs.get("inputs_embeds")
        state["shape"] = tuple(given.shape[:2]) if isinstance(given, torch.Tensor) else None
        output = inner(*args, **kwargs)
        keep(SCORES, model, None, output)
        return output

    model.forward = counted
    try:
        yield
    finally:
        if own:
            model.forward = inner
        else:
            del model.forward


def within(tolerance: Tolerance) -> Departs:
    """The run's elementwise tolerance (``atol + rtol * |expected|``), as the failing check compared scores."""

    def departs(expected: Any, actual: Any, share: float) -> bool:
        from ._common import compare_scores

        scaled = Tolerance(atol=tolerance.atol * share, rtol=tolerance.rtol * share)
        return compare_scores(expected, actual, scaled) is not None

    return departs


def _difference(expected: Any, actual: Any) -> float:
    import torch

    return float(torch.nan_to_num((actual - expected).abs(), nan=float("inf")).max())


def _layer_of(name: str) -> str | None:
    """``model.layers.3`` for ``model.layers.3.self_attn.q_proj``: the decoder layer (an item of a ModuleList)."""
    match = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else None


def locate(expected: Trace, actual: Trace, positions: Sequence[int], departs: Departs) -> Departure | None:
    """The first module of ``actual`` whose output departs from ``expected``'s while its input does not, at the
    coarsest of ``SHARES`` of the bound where one does; inside a container (a decoder layer), the first of its
    own modules that does so, at that share or finer."""
    shared = [n for n in actual.modules if n in expected.modules and n != SCORES]
    shared = [n for n in shared if expected.modules[n].output.shape == actual.modules[n].output.shape]
    found = _first_origin(expected, actual, shared, positions, departs, SHARES)
    while found is not None:
        inside = [n for n in shared if n.startswith(found.name + ".")]
        finer = tuple(share for share in SHARES if share <= found.share)
        deeper = _first_origin(expected, actual, inside, positions, departs, finer) if inside else None
        if deeper is None:
            return found
        found = dataclasses.replace(deeper, layers=found.layers or deeper.layers, compared=found.compared)
    return None


def _first_origin(
    expected: Trace,
    actual: Trace,
    names: list[str],
    positions: Sequence[int],
    departs: Departs,
    shares: Sequence[float],
) -> Departure | None:
    for share in shares:
        verdicts = []
        for name in names:
            wanted, got = expected.modules[name], actual.modules[name]
            verdicts.append((name, _difference(wanted.output, got.output), departs(wanted.output, got.output, share)))
        for at, (name, _, off) in enumerate(verdicts):
            wanted, got = expected.modules[name], actual.modules[name]
            comparable = wanted.input is not None and got.input is not None and wanted.input.shape == got.input.shape
            if off and not (comparable and departs(wanted.input, got.input, share / 8)):
                return _departure(name, wanted, got, positions, verdicts, at, comparable, share)
    return None


def _departure(
    name: str,
    wanted: _Kept,
    got: _Kept,
    positions: Sequence[int],
    verdicts: list,
    at: int,
    comparable: bool,
    share: float,
) -> Departure:
    import torch

    gap = torch.nan_to_num((got.output - wanted.output).abs(), nan=float("inf"))
    row, index = divmod(int(gap.argmax()), gap.shape[1])
    return Departure(
        name=name,
        cls=got.cls,
        position=positions[row],
        index=index,
        expected=float(wanted.output[row, index]),
        actual=float(got.output[row, index]),
        difference=float(gap[row, index]),
        input_difference=_difference(wanted.input, got.input) if comparable else None,
        neighbours=verdicts[max(0, at - 2) : at + 3],
        layers=_layers_around(verdicts, _layer_of(name)),
        compared=len(verdicts),
        share=share,
    )


def _layers_around(verdicts: list, layer: str | None) -> list[tuple[str, float, bool]]:
    """The decoder layers' own outputs, the departing one with the one before and after it."""
    layers = [v for v in verdicts if _layer_of(v[0]) == v[0]]
    at = next((i for i, v in enumerate(layers) if v[0] == layer), None)
    return [] if at is None else layers[max(0, at - 1) : at + 2]


def localisation_rows(model: Any, replay: Replay, departs: Departs) -> list[tuple[str, object]]:
    """The failure-message rows that say where ``replay``'s sides part, or why that could not be found. A replay
    that raises is reported in one row: it must never hide the failure being reported."""
    positions = list(replay.positions)
    try:
        expected, actual = (record(side, model, positions) for side in (replay.expected, replay.actual))
    except Exception as exc:  # a broken model may also break under replay
        return not_located(exc)
    return departure_rows(expected, actual, (replay.expected.label, replay.actual.label), positions, departs)


def not_located(exc: BaseException) -> list[tuple[str, object]]:
    from ._common import first_line

    return [("first departing module", f"not located: replaying the two sides raised {first_line(exc)}")]


def departure_rows(
    expected: Trace, actual: Trace, labels: tuple[str, str], positions: Sequence[int], departs: Departs
) -> list[tuple[str, object]]:
    """Where two recorded traces part, as failure-message rows."""
    for label, trace in zip(labels, (expected, actual), strict=True):
        if not trace.modules:
            return [
                (
                    "first departing module",
                    f"not located: no module output of {label} covers position(s) {list(positions)} as a sequence "
                    "(its forward was fed other positions: a cache that already held some of the prompt?)",
                )
            ]
    departure = locate(expected, actual, positions, departs)
    if departure is None:
        return [("first departing module", _none_departs(expected, actual, labels, departs))]
    return _describe(departure, labels)


def _none_departs(expected: Trace, actual: Trace, labels: tuple[str, str], departs: Departs) -> str:
    scores = expected.modules.get(SCORES), actual.modules.get(SCORES)
    compared = f"none of {len(expected.modules) - (SCORES in expected.modules)} module outputs departs between {labels[0]} and {labels[1]}"
    reproduced = None not in scores and scores[0].output.shape == scores[1].output.shape
    if reproduced and not departs(scores[0].output, scores[1].output, 1.0):
        return (
            f"not located: replayed, {labels[0]} and {labels[1]} agree (state kept between calls, or "
            "randomness, made the failing run differ from its replay)"
        )
    return (
        f"{compared} at the compared positions: the scores part outside the modules (the model's own forward: its "
        "mask, positions, cache handling or final processing of the logits)"
    )


def _beyond(share: float) -> str:
    return "" if share == 1 else f", beyond 1/{round(1 / share)} of the bound: later modules amplify it past the bound"


def _describe(found: Departure, labels: tuple[str, str]) -> list[tuple[str, object]]:
    first, second = labels
    given = (
        "its input is not compared (ids, or laid out differently on the two sides: a shard)"
        if found.input_difference is None
        else f"its input agrees (Δ {found.input_difference:.3g})"
    )
    rows: list[tuple[str, object]] = [
        (
            "first departing module",
            f"{found.name} ({found.cls}): output at position {found.position}, feature {found.index}: {first} "
            f"{found.expected:.6g}, {second} {found.actual:.6g} (Δ {found.difference:.3g}{_beyond(found.share)}); "
            f"{given}",
        ),
        ("modules around it", "; ".join(f"{n} Δ {d:.3g}{' departs' if off else ''}" for n, d, off in found.neighbours)),
    ]
    if found.layers:
        layers = "; ".join(f"{n} Δ {d:.3g} {'departs' if off else 'agrees'}" for n, d, off in found.layers)
        rows.append(("decoder layers", layers))
    return rows
