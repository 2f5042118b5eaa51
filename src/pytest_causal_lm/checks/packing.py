"""Packed sequences and custom 4D masks: how fine-tuning libraries and prefix-sharing servers call a checkpoint.

Three rows of several sequences each, every sequence compared with the sequence alone at every position:

- packed by ``position_ids`` that restart at 0, with no ``attention_mask`` and no cache (the padding-free format
  of TRL's ``DataCollatorWithFlattening``): transformers detects the restarts in ``masking_utils`` and builds a
  block-causal mask, but only where that detection runs (a forward that fills in a default mask or creates a
  cache skips it); where it did not run the verdict says the format is not promised, and whether it held;
- one row under a 4D block-causal mask ``(batch, 1, query, key)``, additive in the model's dtype, which
  ``masking_utils`` passes through as given;
- a shared prefix with two continuations under one 4D mask (each continuation sees the prefix and itself), as
  prefix-sharing servers and tree speculative decoding build it: each continuation scores as prefix +
  continuation alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    carries_state,
    check_scores,
    error_failure,
    first_line,
    forward_logits,
    id_tensor,
    mismatch_failure,
    names_position_ids,
    resolve_tolerance,
    text_of,
    uses_position_ids,
)
from ._localise import Replay, Side

__all__ = ["assert_packed_sequences_consistent", "packing_unpromised"]

# Two short continuations of DEFAULT_TEXTS[0] for the shared-prefix mask.
CONTINUATIONS = (" I am fine, thank you.", " Woof! Where is my ball?")
_PACKING_FORMAT = "position_ids restarting at 0 per sequence, no attention_mask, use_cache=False"


@dataclass(frozen=True)
class _Segment:
    """One sequence inside a row: its ids, where it starts in the row, and what it is compared against."""

    ids: list[int]
    row: int
    start: int
    label: str
    alone: list[int]  # the ids whose forward gives its expected scores (for a continuation: prefix + itself)
    skip: int = 0  # positions of ``alone`` before the segment (the shared prefix)


@dataclass(frozen=True)
class _Layout:
    """A row of segments, the call that scores it, and how a failure names it."""

    name: str
    segments: list[_Segment]
    kwargs: dict[str, Any]  # input_ids, position_ids, and the 4D mask where there is one
    compared_with: str = "the sequence alone"

    @property
    def short_name(self) -> str:
        """The name without the call's details, for notes and the replay's label."""
        return self.name.split(" (")[0]


@dataclass
class _MaskPaths:
    """What transformers' masking_utils saw during one forward: whether its packed-sequence detection found
    packing, and whether a 4D mask reached it (which it passes through as given)."""

    packing_detected: bool = False
    four_d_received: bool = False


@contextmanager
def _mask_paths() -> Iterator[_MaskPaths]:
    from transformers import masking_utils

    seen = _MaskPaths()
    detect, preprocess = masking_utils.find_packed_sequence_indices, masking_utils._preprocess_mask_arguments

    def detecting(position_ids: Any) -> Any:
        packed = detect(position_ids)
        seen.packing_detected |= packed is not None
        return packed

    def preprocessing(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        seen.four_d_received |= getattr(mask, "ndim", 0) == 4
        return preprocess(*args, **kwargs)

    masking_utils.find_packed_sequence_indices, masking_utils._preprocess_mask_arguments = detecting, preprocessing
    try:
        yield seen
    finally:
        masking_utils.find_packed_sequence_indices, masking_utils._preprocess_mask_arguments = detect, preprocess


# Why a layout is not promised, when masking_utils did not see it: the verdict says so instead of failing.
_NOT_PROMISED = {
    False: "transformers' packed-sequence detection did not run in its forward (it runs only without an "
    "attention_mask and a cache)",
    True: "its forward hands no 4D mask to transformers' masking_utils (which passes one through as given) and "
    "takes none itself",
}


def _skip_reason(model: Any, ids: list[int]) -> str | None:
    # Named in the signature, or read when passed through **kwargs: a forward that names them and ignores them is
    # a bug the comparison shows, not a design to skip.
    named = names_position_ids(model)
    if not named and not uses_position_ids(model, id_tensor([ids], model.device)):
        return (
            f"{type(model).__name__}.forward takes no position_ids: packed sequences cannot restart their "
            "positions, and a continuation cannot follow a shared prefix"
        )
    if carries_state(model):
        return (
            f"{type(model).__name__} carries a recurrent/state-space state from token to token, which neither "
            "position_ids nor a 4D mask can reset between packed sequences"
        )
    return None


def packing_unpromised(model: Any, ids: list[int]) -> str | None:
    """Why transformers does not promise the padding-free format (sequences packed by restarting
    ``position_ids``) for ``model``, or None where it does: ``ids`` cut in two and packed, and masking_utils'
    packed-sequence detection must run in the forward. An error in that forward is left for the caller's own
    packed rows to report."""
    reason = _skip_reason(model, ids)
    if reason:
        return reason
    half = len(ids) // 2
    kwargs = {"position_ids": id_tensor([[*range(half), *range(len(ids) - half)]], model.device), "use_cache": False}
    with _mask_paths() as seen:
        try:
            forward_logits(model, id_tensor([ids], model.device), **kwargs)
        except Exception:
            return None
    return None if seen.packing_detected else _NOT_PROMISED[False]


def _window(model: Any) -> int | None:
    """The shortest attention window the config declares (a 4D mask is used as given by every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    windows = [
        getattr(config, name, None) for name in ("sliding_window", "sliding_window_size", "attention_chunk_size")
    ]
    return min((w for w in windows if isinstance(w, int) and w > 0), default=None)


def assert_packed_sequences_consistent(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS,
    continuations: Sequence[str] = CONTINUATIONS,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Sequences packed by restarting ``position_ids``, under a 4D block-causal mask, and continuations sharing a
    prefix under one 4D mask each score as the sequence alone."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("packed sequences", tolerance=tolerance)
    rows = [tokenizer(text)["input_ids"] for text in texts]
    prefix = rows[0]
    tails = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
    reason = _skip_reason(model, rows[1])
    if reason:
        pytest.skip(f"packed sequences: {reason}")
    alone: dict[tuple[int, ...], Any] = {}
    if _run_layout(model, tokenizer, _packed_layout(model, rows, texts), alone, result):
        result.note(f"{len(texts)} sequences packed in two orders ({_PACKING_FORMAT})")
    _four_d(model, tokenizer, rows, texts, prefix, tails, alone, result)
    return result


def _run_layout(model: Any, tokenizer: Any, layout: _Layout, alone: dict, result: CheckResult) -> bool:
    """Compare ``layout`` with each sequence alone; True where transformers promises it, else a note."""
    __tracebackhide__ = True
    four_d = "attention_mask" in layout.kwargs
    error = None
    with _mask_paths() as seen:
        try:
            logits = forward_logits(model, **layout.kwargs)
        except Exception as exc:
            error = exc
    # A 4D mask is promised where masking_utils receives it, and wherever the forward takes one without complaint:
    # ignoring a mask it accepted would answer wrongly in silence. A packed row is a plain call with position_ids:
    # an error there is a failure whatever transformers detected.
    promised = (seen.four_d_received or error is None) if four_d else seen.packing_detected
    if error is not None and (promised or not four_d):
        raise error_failure(error, model, layout.name) from None
    if not promised:
        outcome = (
            f"raises {first_line(error)}" if error is not None else _departure(model, layout, logits, alone, result)
        )
        result.note(_unpromised_note(model, layout, _NOT_PROMISED[four_d], outcome))
        return False
    _compare(model, tokenizer, layout, logits, alone, result)
    return True


def _four_d(
    model: Any,
    tokenizer: Any,
    rows: list,
    texts: Sequence[str],
    prefix: list,
    tails: list,
    alone: dict,
    result: CheckResult,
) -> None:
    """The two 4D-mask layouts, where one mask can serve every layer."""
    __tracebackhide__ = True
    implementation = str(getattr(model.config, "_attn_implementation", ""))
    window = _window(model)
    longest = max([len(r) for r in rows] + [len(prefix) + len(t) for t in tails])
    if implementation.startswith(("flash", "flex")):
        result.note(f"4D masks: not compared: {implementation} takes no additive 4D mask")
    elif window is not None and window < longest:
        result.note(
            f"4D masks: not compared: every layer uses a 4D mask as given, and the config's window of {window} is "
            f"shorter than the {longest}-token sequences"
        )
    else:
        layouts = (_block_causal(model, rows, texts), _shared_prefix(model, prefix, tails))
        if all([_run_layout(model, tokenizer, layout, alone, result) for layout in layouts]):
            result.note("a 4D block-causal mask and a prefix shared by two continuations under one 4D mask")


def _packed_layout(model: Any, rows: list[list[int]], texts: Sequence[str]) -> _Layout:
    """Two rows packing every sequence in two orders, so each sequence sits at the start and after others."""
    orders = [list(range(len(rows))), [len(rows) - 1, *range(len(rows) - 1)]]
    ids, positions, segments = [], [], []
    for row, order in enumerate(orders):
        starts = [sum(len(rows[k]) for k in order[:i]) for i in range(len(order))]
        segments += [
            _Segment(rows[k], row, start, f"sequence {k} {texts[k]!r}", rows[k])
            for k, start in zip(order, starts, strict=True)
        ]
        ids.append([t for k in order for t in rows[k]])
        positions.append([p for k in order for p in range(len(rows[k]))])
    kwargs = {
        "input_ids": id_tensor(ids, model.device),
        "position_ids": id_tensor(positions, model.device),
        "use_cache": False,
    }
    return _Layout(f"packed by position_ids ({_PACKING_FORMAT})", segments, kwargs)


def _four_d_mask(model: Any, owner: list[int], shared: int | None = None) -> Any:
    """The additive ``(1, 1, n, n)`` mask where token i sees token j <= i of its own segment (and of segment
    ``shared``, the prefix every continuation sees), 0 where it may attend and the dtype's minimum elsewhere."""
    import torch

    segment = torch.tensor(owner)
    index = torch.arange(len(owner))
    same = segment[:, None] == segment[None, :]
    if shared is not None:
        same |= segment[None, :] == shared
    allowed = same & (index[None, :] <= index[:, None])
    mask = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
    return mask[None, None].to(model.device)


def _block_causal(model: Any, rows: list[list[int]], texts: Sequence[str]) -> _Layout:
    starts = [sum(len(r) for r in rows[:k]) for k in range(len(rows))]
    owner = [k for k, row in enumerate(rows) for _ in row]
    kwargs = {
        "input_ids": id_tensor([[t for row in rows for t in row]], model.device),
        "position_ids": id_tensor([[p for row in rows for p in range(len(row))]], model.device),
        "attention_mask": _four_d_mask(model, owner),
        "use_cache": False,
    }
    segments = [
        _Segment(row, 0, start, f"sequence {k} {texts[k]!r}", row)
        for k, (row, start) in enumerate(zip(rows, starts, strict=True))
    ]
    return _Layout("4D block-causal mask", segments, kwargs)


def _shared_prefix(model: Any, prefix: list[int], tails: list[list[int]]) -> _Layout:
    starts = [len(prefix) + sum(len(t) for t in tails[:i]) for i in range(len(tails))]
    owner = [0] * len(prefix) + [i + 1 for i, tail in enumerate(tails) for _ in tail]
    kwargs = {
        "input_ids": id_tensor([prefix + [t for tail in tails for t in tail]], model.device),
        "position_ids": id_tensor(
            [list(range(len(prefix))) + [len(prefix) + p for t in tails for p in range(len(t))]], model.device
        ),
        "attention_mask": _four_d_mask(model, owner, shared=0),
        "use_cache": False,
    }
    segments = [_Segment(prefix, 0, 0, "the shared prefix", prefix + tails[0])]
    segments += [
        _Segment(tail, 0, start, f"continuation {i}", prefix + tail, skip=len(prefix))
        for i, (tail, start) in enumerate(zip(tails, starts, strict=True))
    ]
    return _Layout("4D mask sharing a prefix between two continuations", segments, kwargs, "the prefix and it alone")


def _expected(model: Any, segment: _Segment, alone: dict) -> Any:
    key = tuple(segment.alone)
    if key not in alone:
        alone[key] = _alone(model, segment.alone)
    return alone[key][segment.skip : segment.skip + len(segment.ids)]


def _actual(segment: _Segment, logits: Any) -> Any:
    return logits[segment.row, segment.start : segment.start + len(segment.ids)]


def _compare(model: Any, tokenizer: Any, layout: _Layout, logits: Any, alone: dict, result: CheckResult) -> None:
    """Every segment of ``layout`` scores as its own forward."""
    __tracebackhide__ = True
    for segment in layout.segments:
        mismatch = check_scores(result, _expected(model, segment, alone), _actual(segment, logits), result.tolerance)
        if mismatch:
            raise _failure(model, tokenizer, layout, segment, mismatch, result.tolerance)


def _departure(model: Any, layout: _Layout, logits: Any, alone: dict, result: CheckResult) -> str:
    """Whether a layout that is not promised held all the same, for the verdict's note."""
    from ._common import compare_scores

    for segment in layout.segments:
        mismatch = compare_scores(_expected(model, segment, alone), _actual(segment, logits), result.tolerance)
        if mismatch is not None:
            return f"not honoured ({segment.label} differs by {mismatch.greatest_difference:.3g})"
    return "honoured all the same"


def _alone_kwargs(model: Any, ids: list[int]) -> dict[str, Any]:
    """``ids`` alone at positions 0..n-1, as the packed layouts place them (a model whose default positions start
    elsewhere, RoBERTa's padding_idx + 1, is compared like with like)."""
    return {
        "input_ids": id_tensor([ids], model.device),
        "position_ids": id_tensor([list(range(len(ids)))], model.device),
    }


def _alone(model: Any, ids: list[int]) -> Any:
    return forward_logits(model, **_alone_kwargs(model, ids))[0]


def _unpromised_note(model: Any, layout: _Layout, why: str, outcome: str) -> str:
    return f"{layout.short_name}: not promised for {type(model).__name__}: {why}; {outcome}"


def _failure(
    model: Any, tokenizer: Any, layout: _Layout, segment: _Segment, mismatch: Any, tolerance: Tolerance
) -> AssertionError:
    end = segment.start + len(segment.ids) - 1
    replay = Replay(
        Side(layout.compared_with, lambda: model(**_alone_kwargs(model, segment.alone)), offset=-segment.skip),
        Side(layout.short_name, lambda: model(**layout.kwargs), row=segment.row, offset=-segment.start),
        (segment.skip + mismatch.first_position,),
    )
    return mismatch_failure(
        f"{layout.name}: {segment.label} scores differently from {layout.compared_with}",
        model,
        tokenizer,
        [
            ("sequence", text_of(tokenizer, segment.ids)),
            (
                "packed at",
                f"tokens {segment.start}..{end} of row {segment.row} ({layout.kwargs['input_ids'].shape[1]} tokens)",
            ),
            ("likely cause", _cause(model, layout, segment, tolerance)),
        ],
        mismatch,
        tolerance,
        position_label="position in the sequence",
        replay=replay,
    )


def _cause(model: Any, layout: _Layout, segment: _Segment, tolerance: Tolerance) -> str:
    """For packing by position_ids, whether the same row under a 4D block-causal mask separates the sequences."""
    from ._common import compare_scores

    if "attention_mask" in layout.kwargs:
        return (
            "the 4D mask does not reach attention as given: a port that builds its own causal mask, or turns every "
            "mask from 0/1 into additive form (a 4D mask already is)"
        )
    positions = layout.kwargs["position_ids"][segment.row].tolist()
    owner = [sum(1 for p in positions[1 : i + 1] if p == 0) for i in range(len(positions))]
    kwargs = {**layout.kwargs, "attention_mask": _four_d_mask(model, owner)}
    kwargs["input_ids"], kwargs["position_ids"] = (
        kwargs[k][segment.row : segment.row + 1] for k in ("input_ids", "position_ids")
    )
    span = slice(segment.start, segment.start + len(segment.ids))
    masked = forward_logits(model, **kwargs)[0, span]
    expected = _alone(model, segment.alone)[segment.skip : segment.skip + len(segment.ids)]
    if compare_scores(expected, masked, tolerance) is None:
        return (
            "the sequences are not separated by their restarting position_ids (a 4D block-causal mask separates "
            "them): transformers detects packing only when no attention_mask and no cache reach its mask builder, "
            "so a forward that fills in a default mask or cache hides the restarts"
        )
    return "a 4D block-causal mask over the same row differs from the sequence alone too: positions or the mask do not reach attention as given"
