"""Attention implementations: every kernel the model supports and the machine has gives the same scores and
the same greedy continuation as the plain-math ``eager`` path.

One loaded model is switched in place with ``set_attn_implementation`` and switched back at the end. A kernel
that forgets the attention scale, a soft-cap, a sliding window or the padding mask shows here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    error_failure,
    first_line,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
    transformers_refusal,
)
from ._generation import GreedyRun, compare_continuations, generate_scored
from ._localise import Replay, Side

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "assert_attention_implementations_agree",
    "implementation",
    "runnable_implementations",
]

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class _Observed:
    """What one implementation gave: plain scores, left-padded batch scores, greedy continuation."""

    plain: Any
    batch: Any
    generated: Any


def _switch(model: Any, name: str) -> str | None:
    """Switch ``model`` to ``name``; why not, when it cannot run here."""
    if name == "flex_attention" and model.device.type == "cpu":
        return "compiles its kernel at first use (tens of seconds on CPU); compared on accelerators"
    try:
        model.set_attn_implementation(name)
    except Exception as exc:
        words = transformers_refusal(exc) or _kernel_unavailable(exc)
        if words is None:
            raise error_failure(exc, model, f"switching to the {name} attention implementation") from None
        return words[:160]
    kept = model.config._attn_implementation
    if kept != name:  # a model outside AttentionInterface logs a warning and keeps what it loaded with
        return f"{type(model).__name__} keeps {kept}: it cannot switch its attention implementation after loading"
    return None


def runnable_implementations(model: Any) -> tuple[list[str], list[str]]:
    """The attention implementations ``model`` runs here, the loaded one first, and why each other one does not.
    The loaded one is restored."""
    loaded = model.config._attn_implementation
    runnable, passed_over = [], []
    try:
        for name in dict.fromkeys((loaded, "eager", *ATTENTION_IMPLEMENTATIONS)):
            why = _switch(model, name)
            if why:
                passed_over.append(f"{name} ({why})")
            else:
                runnable.append(name)
    finally:
        model.set_attn_implementation(loaded)
    return runnable, passed_over


def _kernel_unavailable(exc: BaseException) -> str | None:
    """Why a Hub kernel that transformers fetches for a missing attention package could not be had (offline, or
    not trusted here), or None when the exception was not raised by the ``kernels`` package."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if frames and f"{os.sep}kernels{os.sep}" in frames[-1].filename:
        return f"its kernel could not be fetched from the Hub here: {first_line(exc)}"
    return None


@contextmanager
def implementation(model: Any, name: str) -> Iterator[None]:
    """The block under the ``name`` attention implementation ("": the loaded one), the loaded one restored after."""
    loaded = model.config._attn_implementation
    if name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if name:
            model.set_attn_implementation(loaded)


def _under(model: Any, name: str, **inputs: Any) -> Any:
    """A forward of ``inputs`` with the ``name`` attention implementation, replayable; the loaded one is restored."""

    def run() -> Any:
        with implementation(model, name):
            return model(**inputs)

    return run


def _replay(model: Any, names: tuple[str, str], positions: tuple[int, ...], row: int = 0, **inputs: Any) -> Replay:
    first, second = (Side(name, _under(model, name, **inputs), row=row) for name in names)
    return Replay(first, second, positions)


def _observe(model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int) -> _Observed:
    ids = encode(tokenizer, texts[1], model.device)
    batch, mask, positions = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
    batch_scores = forward_logits(model, batch, attention_mask=mask, position_ids=positions)
    generated = generate_scored(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    return _Observed(forward_logits(model, ids)[0], (batch_scores, mask), generated)


def assert_attention_implementations_agree(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS,
    max_new_tokens: int = 6,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Scores (plain and left-padded batch) and greedy continuation agree across attention implementations.

    Compared: the loaded implementation and every one of ``ATTENTION_IMPLEMENTATIONS`` that the model supports
    and this machine can run, each against ``eager`` (else the loaded one). The result notes which pairs.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    loaded = model.config._attn_implementation
    observed: dict[str, _Observed] = {}
    passed_over: list[str] = []
    try:
        for name in dict.fromkeys(("eager", loaded, *ATTENTION_IMPLEMENTATIONS)):
            why = _switch(model, name)
            if why:
                passed_over.append(f"{name} ({why})")
                continue
            observed[name] = _observe(model, tokenizer, texts, max_new_tokens)
    finally:
        model.set_attn_implementation(loaded)
    if len(observed) < 2:
        pytest.skip(
            f"only {', '.join(observed) or 'no implementation'} can run here; not run: {'; '.join(passed_over)}"
        )
    reference = "eager" if "eager" in observed else loaded
    result = CheckResult("attention implementations", tolerance=tolerance)
    for name, other in observed.items():
        if name != reference:
            _compare(model, tokenizer, texts, (reference, observed[reference]), (name, other), result)
    result.note(f"compared with {reference}: {', '.join(n for n in observed if n != reference)} (loaded: {loaded})")
    if passed_over:
        result.note("not run: " + "; ".join(passed_over))
    return result


def _compare(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    reference: tuple[str, _Observed],
    other: tuple[str, _Observed],
    result: CheckResult,
) -> None:
    __tracebackhide__ = True
    (ref_name, ref), (name, run) = reference, other
    title = f"attention implementation {name!r} differs from {ref_name!r}"
    mismatch = check_scores(result, ref.plain, run.plain, result.tolerance)
    if mismatch:
        ids = encode(tokenizer, texts[1], model.device)
        replay = _replay(model, (ref_name, name), (mismatch.first_position,), input_ids=ids)
        raise mismatch_failure(
            title, model, tokenizer, [("input", repr(texts[1]))], mismatch, result.tolerance, replay=replay
        )
    (ref_batch, mask), (batch, _) = ref.batch, run.batch
    for row in range(mask.shape[0]):
        kept = mask[row].bool().cpu()
        mismatch = check_scores(result, ref_batch[row][kept], batch[row][kept], result.tolerance)
        if mismatch:
            pads = int((~kept).sum())
            batch_ids, mask_ids, positions = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
            inputs = {"input_ids": batch_ids, "attention_mask": mask_ids, "position_ids": positions}
            replay = _replay(model, (ref_name, name), (pads + mismatch.first_position,), row=row, **inputs)
            raise mismatch_failure(
                f"{title} on a left-padded batch (row {row}, {pads} pad tokens)",
                model,
                tokenizer,
                [("input", repr(texts[row])), ("positions", "counted from the first real token")],
                mismatch,
                result.tolerance,
                replay=replay,
            )
    ids = encode(tokenizer, texts[1], model.device)
    compare_continuations(
        model,
        tokenizer,
        ids,
        GreedyRun(tokens=ref.generated.rows[0], step_scores=list(ref.generated.logits[0])),
        run.generated.rows[0],
        reference_label=f"generate with {ref_name}",
        other_label=f"generate with {name}",
        tolerance=result.tolerance,
        result=result,
        title=title,
    )
