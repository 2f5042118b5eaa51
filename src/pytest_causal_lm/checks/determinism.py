"""Determinism: the same input twice gives the same scores (catches dropout left on at inference)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    forward_logits,
    mismatch_failure,
    resolve_tolerance,
    text_of,
)

__all__ = ["assert_deterministic"]


def assert_deterministic(
    model: Any, tokenizer: Any, *, texts: Sequence[str] = DEFAULT_TEXTS, tolerance: Tolerance | None = None
) -> CheckResult:
    """Two forward passes of each text give scores equal within the tolerance."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("determinism", tolerance=tolerance)
    for text in texts:
        input_ids = encode(tokenizer, text, model.device)
        first = forward_logits(model, input_ids)[0]
        second = forward_logits(model, input_ids)[0]
        mismatch = check_scores(result, first, second, tolerance)
        if mismatch:
            hint = (
                "the model is in training mode: call model.eval()"
                if getattr(model, "training", False)
                else "something random runs at inference (dropout applied regardless of eval(), random sampling in forward)"
            )
            raise mismatch_failure(
                f"non-deterministic scores: the same input gave different scores at position {mismatch.first_position}",
                model,
                tokenizer,
                [
                    ("input", repr(text)),
                    ("prefix", text_of(tokenizer, input_ids[0, : mismatch.first_position + 1])),
                    ("likely cause", hint),
                ],
                mismatch,
                tolerance,
            )
    return result
