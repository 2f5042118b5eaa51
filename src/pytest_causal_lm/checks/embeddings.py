"""``inputs_embeds``: the embeddings of the ids give the ids' scores, in a forward and through ``generate``.

Multimodal pipelines, soft prompts and prefix tuning feed embeddings instead of ids. An input transform applied
on one path only (Gemma's embedding scale, a position or token-type term) or a forward that changes the
caller's tensor in place shows here.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    failure,
    forward_logits,
    mismatch_failure,
    resolve_tolerance,
    token,
)
from ._generation import (
    assert_generation_matches_forward,
    generate_or_skip,
)

__all__ = [
    "assert_inputs_embeds_match",
]


def _forward_from_embeddings(model: Any, tokenizer: Any, text: str, ids: Any) -> tuple[Any, Any]:
    """``(embeddings of ids, forward(inputs_embeds=...) logits)``; fails if the forward changed the embeddings."""
    __tracebackhide__ = True
    import torch

    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        given = embeds.clone()
        from_embeds = model(inputs_embeds=embeds).logits.float()
    if not torch.equal(embeds, given):
        changed = int((embeds != given).any(dim=-1)[0].nonzero()[0])
        raise failure(
            "forward(inputs_embeds=...) changed the tensor it was given, in place",
            model,
            [
                ("input", repr(text)),
                ("first changed position", f"{changed} (token {token(tokenizer, int(ids[0, changed]))})"),
                ("greatest change", f"{float((embeds - given).abs().max()):.6g}"),
                (
                    "effect",
                    "a second call with the same embeddings (a retry, generate after a forward) sees other inputs",
                ),
            ],
        )
    return embeds, from_embeds


def assert_inputs_embeds_match(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[1],
    max_new_tokens: int = 6,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """``forward(inputs_embeds=get_input_embeddings()(ids))`` equals ``forward(input_ids=ids)``, and ``generate``
    from those embeddings scores every step as a forward pass over the same tokens does.

    An embedding scale (Gemma's sqrt(hidden_size)) or a per-token input transform applied on one path only
    shows here.
    """
    __tracebackhide__ = True
    import torch

    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        pytest.skip(f"{type(model).__name__}.forward has no inputs_embeds argument")
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("inputs_embeds", tolerance=tolerance)
    ids = encode(tokenizer, text, model.device)
    embeds, from_embeds = _forward_from_embeddings(model, tokenizer, text, ids)
    mismatch = check_scores(result, forward_logits(model, ids)[0], from_embeds[0], tolerance)
    if mismatch:
        raise mismatch_failure(
            "forward(inputs_embeds=get_input_embeddings()(ids)) differs from forward(input_ids=ids)",
            model,
            tokenizer,
            [
                ("input", repr(text)),
                ("likely cause", "an input transform (embedding scale, position or token-type term) on one path only"),
            ],
            mismatch,
            tolerance,
        )
    generated = generate_or_skip(
        "generation from inputs_embeds",
        model,
        tokenizer,
        None,
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
    )
    assert_generation_matches_forward(
        model,
        tokenizer,
        ids,
        generated,
        title="generate(inputs_embeds=...)",
        result=result,
        details=[("input", repr(text))],
    )
    return result
