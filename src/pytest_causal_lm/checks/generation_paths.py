"""The other ways into ``generate``: static cache, ``inputs_embeds``, continuing from a returned cache,
assisted and prompt-lookup decoding.

Each path must score every step as one plain forward pass over the same tokens does: the scores the
tutorial's uncached loop would see (given prefix causality, an invariant of its own). Comparing the raw
scores of every step, not only the chosen tokens, catches a wrong path even where its argmax survives.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kind,
    cache_kwargs,
    check_scores,
    default_positions_differ,
    encode,
    failure,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
    text_of,
    token,
)
from .greedy import ScoredGeneration, generate_scored

__all__ = [
    "assert_assisted_decoding_matches",
    "assert_continuation_matches",
    "assert_generation_matches_forward",
    "assert_inputs_embeds_match",
    "assert_static_cache_matches",
    "static_cache_fields",
]

# A prompt that repeats itself, so prompt-lookup decoding finds n-grams to propose and verifies them.
REPEATING_TEXT = (
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick brown"
)


def assert_generation_matches_forward(
    model: Any,
    tokenizer: Any,
    prompt_ids: Any,
    generated: ScoredGeneration,
    *,
    title: str,
    result: CheckResult,
    attention_mask: Any = None,
    details: Sequence[tuple[str, object]] = (),
) -> None:
    """Every step's scores of ``generated`` equal one forward pass over the prompt and the generated tokens.

    A row is compared up to and including its first eos; a padded batch gets its mask and positions counted
    from the mask, as ``generate`` passes them.
    """
    __tracebackhide__ = True
    import torch

    steps = generated.logits.shape[1]
    new = torch.full((prompt_ids.shape[0], steps), pad_id(model, tokenizer), dtype=prompt_ids.dtype)
    for index, row in enumerate(generated.rows):
        new[index, : len(row)] = torch.tensor(row, dtype=prompt_ids.dtype)
    ids = torch.cat([prompt_ids, new.to(prompt_ids.device)], dim=1)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.cat([attention_mask, torch.ones_like(new).to(attention_mask.device)], dim=1)
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    full = forward_logits(model, ids, **kwargs)
    start = prompt_ids.shape[1] - 1
    for index, row in enumerate(generated.rows):
        expected = full[index, start : start + len(row)]
        mismatch = check_scores(result, expected, generated.logits[index, : len(row)], result.tolerance)
        if mismatch:
            cause = default_positions_differ(model, prompt_ids[index : index + 1], result.tolerance)
            raise mismatch_failure(
                f"{title}: step {mismatch.first_position} of row {index} scores differently from one forward pass "
                "over the same tokens",
                model,
                tokenizer,
                [
                    *details,
                    ("generated", text_of(tokenizer, row)),
                    *([("likely cause", cause)] if cause else []),
                ],
                mismatch,
                result.tolerance,
                position_label="step",
            )


def _require_kv_cache(model: Any, input_ids: Any, what: str) -> None:
    kind = cache_kind(model, input_ids)
    if kind != "kv":
        held = "a recurrent/state-space cache (cache_params)" if kind == "recurrent" else "no past_key_values"
        pytest.skip(f"{type(model).__name__} returns {held}; {what} needs a key/value cache")


# How transformers and model code say a generation path is not supported for a model: a refusal, not a wrong answer.
_REFUSAL = re.compile(r"not supported|does not support|doesn't support|only supported|requires a cache|not implemented")


def _generate_or_skip(refusal: str, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> ScoredGeneration:
    """``generate_scored``, skipping with transformers' own words when it refuses the path for this model
    (a refusal is an error the user sees, not a wrong answer); any other exception propagates."""
    try:
        return generate_scored(model, tokenizer, *args, **kwargs)
    except (ValueError, NotImplementedError, RuntimeError, AssertionError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, (RuntimeError, AssertionError)) and not _REFUSAL.search(first_line):
            raise
        pytest.skip(f"{refusal}: {first_line[:300]}")


def _generate_or_fail(title: str, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> ScoredGeneration:
    """``generate_scored`` on a path that already worked once: an exception now is the bug (a stale state)."""
    try:
        return generate_scored(model, tokenizer, *args, **kwargs)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise failure(
            f"{title}: generate raised {type(exc).__name__} after an earlier call on this path succeeded",
            model,
            [("error", first_line), ("likely cause", "state kept from the earlier call (a cache not reset)")],
        ) from exc


def static_cache_fields(*, compile: bool) -> dict[str, Any]:
    """GenerationConfig fields of static-cache generation, compiled on every device or not at all."""
    if not compile:
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    compile_config = CompileConfig()  # transformers' own choice: reduce-overhead (CUDA graphs where available)
    compile_config._compile_all_devices = True  # transformers compiles by itself only on accelerators
    return {"cache_implementation": "static", "compile_config": compile_config}


def assert_static_cache_matches(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS,
    max_new_tokens: int = 6,
    compile: bool = False,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """``generate(cache_implementation="static")`` scores every step as a forward pass does: on a prompt, then a
    longer one (a reused static cache must keep nothing of the first call: not its keys, not its write
    position), then a left-padded batch.

    With ``compile``, the static cache runs under ``torch.compile`` (on every device; transformers compiles
    static-cache generation by itself only on accelerators). Without it, compilation is turned off.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("static cache" + (" + compile" if compile else ""), tolerance=tolerance)
    fields = static_cache_fields(compile=compile)
    shorter, longer = sorted(texts[:2], key=len)
    ids = encode(tokenizer, shorter, model.device)
    _require_kv_cache(model, ids, "a static cache")
    cases = [("first call", ids, None), ("second call, longer prompt", encode(tokenizer, longer, model.device), None)]
    batch, mask, _ = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
    cases.append((f"left-padded batch of {len(texts)}", batch, mask))
    refusal = f"{type(model).__name__} does not generate with cache_implementation='static'"
    for number, (label, prompt, prompt_mask) in enumerate(cases):
        kwargs = {"attention_mask": prompt_mask, "max_new_tokens": max_new_tokens, "config_fields": fields}
        if number == 0:
            generated = _generate_or_skip(refusal, model, tokenizer, prompt, **kwargs)
        else:
            generated = _generate_or_fail(f"{result.invariant} ({label})", model, tokenizer, prompt, **kwargs)
        assert_generation_matches_forward(
            model,
            tokenizer,
            prompt,
            generated,
            title=f"{result.invariant} differs ({label})",
            result=result,
            attention_mask=prompt_mask,
            details=[("prompt", text_of(tokenizer, prompt[-1]))],
        )
    result.note(f"{len(cases)} static-cache generations, compile {'on' if compile else 'off'}")
    return result


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
    refusal = f"{type(model).__name__} does not generate from inputs_embeds"
    generated = _generate_or_skip(
        refusal,
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


def assert_continuation_matches(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[1],
    next_turn: str = " And what does that mean for the dog?",
    steps: int = 4,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Continuing ``generate`` from the ``past_key_values`` it returned scores every step as one forward pass
    over the whole conversation does: after ``steps`` tokens, then again after a new multi-token turn is
    appended (multi-turn chat reuses the cache that way), ``steps`` more each time."""
    __tracebackhide__ = True
    import torch

    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("continuation", tolerance=tolerance)
    ids = encode(tokenizer, text, model.device)
    _require_kv_cache(model, ids, "continuing from a returned cache")
    turn = tokenizer(next_turn, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    generated = generate_scored(model, tokenizer, ids, max_new_tokens=steps, min_new_tokens=steps)
    cases = [("continued", None), (f"continued after a new turn {next_turn!r}", turn)]
    for label, appended in cases:
        ids = torch.cat([ids, torch.tensor([generated.rows[0]], device=ids.device)], dim=1)
        if appended is not None:
            ids = torch.cat([ids, appended], dim=1)
        generated = generate_scored(
            model, tokenizer, ids, max_new_tokens=steps, min_new_tokens=steps, **cache_kwargs(model, generated.cache)
        )
        assert_generation_matches_forward(
            model,
            tokenizer,
            ids,
            generated,
            title=f"generate {label} from its returned past_key_values",
            result=result,
            details=[("conversation", text_of(tokenizer, ids[0]))],
        )
    return result


def assert_assisted_decoding_matches(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[1],
    repeating_text: str = REPEATING_TEXT,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Assisted decoding with the model as its own assistant, and prompt-lookup decoding on a prompt that
    repeats itself, score every step as one forward pass does (both verify several proposed tokens per
    forward, with ``logits_to_keep`` > 1, and crop the cache after a rejection)."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("assisted decoding", tolerance=tolerance)
    ids = encode(tokenizer, text, model.device)
    _require_kv_cache(model, ids, "assisted decoding")
    repeating = encode(tokenizer, repeating_text, model.device)
    cases = [
        ("assisted by itself", ids, {}, {"assistant_model": model}),
        ("prompt lookup", repeating, {"prompt_lookup_num_tokens": 3}, {}),
    ]
    for label, prompt, fields, inputs in cases:
        generated = _generate_or_skip(
            f"{type(model).__name__} does not support {label} decoding",
            model,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            config_fields=fields,
            **inputs,
        )
        assert_generation_matches_forward(
            model,
            tokenizer,
            prompt,
            generated,
            title=f"{label} decoding",
            result=result,
            details=[("prompt", text_of(tokenizer, prompt[0]))],
        )
    return result
