"""The cache: KV-cache parity (cached scores equal the full forward's), cache effectiveness (one new token per
step), and static-cache generation (a preallocated cache, reused across calls, scores as a forward pass does)."""

from __future__ import annotations

import itertools
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
    encode,
    failure,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
    returned_cache,
    text_of,
    token,
)
from ._generation import (
    assert_generation_matches_forward,
    generate_or_fail,
    generate_or_skip,
    generate_scored,
    greedy_generate,
    require_kv_cache,
    static_cache_fields,
)
from ._localise import Replay, Side

__all__ = [
    "assert_cache_effective",
    "assert_kv_cache_parity",
    "assert_static_cache_matches",
]


def _require_standard_cache(model: Any, input_ids: Any) -> None:
    kind = cache_kind(model, input_ids)
    if kind != "kv":
        what = "a recurrent/state-space cache (cache_params)" if kind == "recurrent" else "no past_key_values"
        pytest.skip(f"{type(model).__name__} returns {what}; KV-cache parity needs a key/value cache")


def assert_kv_cache_parity(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[1],
    padded_texts: Sequence[str] = DEFAULT_TEXTS,
    appended_tokens: int = 4,
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> CheckResult:
    """Scores from incremental decoding with ``past_key_values`` equal the full forward's, at every position.

    Three ways: prefill then one token per step; prefill in 2 and in 3 chunks;
    a left-padded batch prefilled, then extended token by token.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("KV-cache parity", tolerance=tolerance)
    input_ids = encode(tokenizer, text, model.device)
    _require_standard_cache(model, input_ids)
    full = forward_logits(model, input_ids)[0]
    _check_stepwise_decoding(model, tokenizer, input_ids, full, result)
    for chunks in (2, 3):
        _check_chunked_prefill(model, tokenizer, input_ids, full, chunks, result)
    _check_padded_batch_decoding(model, tokenizer, padded_texts, appended_tokens, seed, result)
    return result


def _cache_failure(
    title: str,
    model: Any,
    tokenizer: Any,
    ids: Any,
    where: tuple[str, object],
    mismatch: Any,
    result: CheckResult,
    replay: Replay,
) -> AssertionError:
    return mismatch_failure(
        f"KV-cache parity violated: {title}",
        model,
        tokenizer,
        [("input", text_of(tokenizer, ids)), where],
        mismatch,
        result.tolerance,
        replay=replay,
    )


def _forward(model: Any, **inputs: Any) -> Any:
    """One full forward of ``inputs``, replayable: the side every cached path is compared with."""
    return lambda: model(**inputs)


def _cached(model: Any, pieces: Sequence[dict[str, Any]]) -> Any:
    """Forwards of ``pieces`` in turn, each after the cache of the ones before, replayable."""

    def run() -> None:
        cache = None
        for inputs in pieces:
            cache = returned_cache(model(**inputs, **cache_kwargs(model, cache), use_cache=True))

    return run


def _check_stepwise_decoding(model: Any, tokenizer: Any, input_ids: Any, full: Any, result: CheckResult) -> None:
    """Prefill a third of the text, then feed one token per step; every step's scores equal the full forward's."""
    __tracebackhide__ = True
    import torch

    length = input_ids.shape[1]
    prefill = max(1, length // 3)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=input_ids[:, :prefill], use_cache=True))
        for position in range(prefill, length):
            out = model(input_ids=input_ids[:, position : position + 1], **cache_kwargs(model, cache), use_cache=True)
            cache = returned_cache(out)
            mismatch = check_scores(result, full[position : position + 1], out.logits[0].float(), result.tolerance)
            if mismatch:
                step = position - prefill + 1
                pieces = [{"input_ids": input_ids[:, :prefill]}]
                pieces += [{"input_ids": input_ids[:, at : at + 1]} for at in range(prefill, position + 1)]
                replay = Replay(
                    Side("the full forward", _forward(model, input_ids=input_ids)),
                    Side(f"cached step {step}", _cached(model, pieces), call=step, offset=position),
                    (position,),
                )
                raise _cache_failure(
                    f"decoding step {step} (position {position}, token {token(tokenizer, int(input_ids[0, position]))}) "
                    "differs from the full forward",
                    model,
                    tokenizer,
                    input_ids[0],
                    ("prefill", f"{prefill} tokens, then one token per step"),
                    mismatch,
                    result,
                    replay,
                )


def _check_chunked_prefill(
    model: Any, tokenizer: Any, input_ids: Any, full: Any, chunks: int, result: CheckResult
) -> None:
    """Prefill in ``chunks`` pieces, each after the cache of the ones before; each piece's scores equal the full forward's."""
    __tracebackhide__ = True
    import torch

    bounds = torch.linspace(0, input_ids.shape[1], chunks + 1).round().long().tolist()
    cache = None
    with torch.no_grad():
        for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
            if stop <= start:
                continue
            out = model(input_ids=input_ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True)
            cache = returned_cache(out)
            mismatch = check_scores(result, full[start:stop], out.logits[0].float(), result.tolerance)
            if mismatch:
                pieces = [{"input_ids": input_ids[:, a:b]} for a, b in itertools.pairwise(bounds[: index + 2]) if b > a]
                replay = Replay(
                    Side("the full forward", _forward(model, input_ids=input_ids)),
                    Side(f"chunk {index + 1}", _cached(model, pieces), call=len(pieces) - 1, offset=start),
                    tuple(range(start, stop)),
                )
                raise _cache_failure(
                    f"chunk {index + 1} of {chunks} (positions {start}..{stop - 1}) differs from the full forward "
                    f"at position {start + mismatch.first_position}",
                    model,
                    tokenizer,
                    input_ids[0],
                    ("chunked prefill", f"boundaries {bounds}"),
                    mismatch,
                    result,
                    replay,
                )


def _padded_decoding(tokenizer: Any, model: Any, texts: Sequence[str], appended: int, seed: int) -> tuple[dict, list]:
    """The whole left-padded batch with ``appended`` random tokens, and the same as a prefill then one-token steps
    (each with its mask so far and positions counted from the mask)."""
    import torch

    ids, mask, positions = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    extra = torch.randint(0, high, (ids.shape[0], appended), generator=torch.Generator().manual_seed(seed))
    all_ids = torch.cat([ids, extra.to(model.device)], dim=1)
    all_mask = torch.cat([mask, torch.ones_like(extra).to(model.device)], dim=1)
    all_positions = (all_mask.cumsum(-1) - 1).clamp(min=0)
    pieces = [{"input_ids": ids, "attention_mask": mask, "position_ids": positions}]
    for at in range(ids.shape[1], all_ids.shape[1]):
        step = {"input_ids": all_ids[:, at : at + 1], "position_ids": all_positions[:, at : at + 1]}
        pieces.append({**step, "attention_mask": all_mask[:, : at + 1]})
    return {"input_ids": all_ids, "attention_mask": all_mask, "position_ids": all_positions}, pieces


def _check_padded_batch_decoding(
    model: Any, tokenizer: Any, texts: Sequence[str], appended: int, seed: int, result: CheckResult
) -> None:
    """A left-padded batch prefilled, then ``appended`` random tokens fed one per step with mask and positions."""
    __tracebackhide__ = True
    import torch

    whole, pieces = _padded_decoding(tokenizer, model, texts, appended, seed)
    width, mask = pieces[0]["input_ids"].shape[1], whole["attention_mask"]
    batch_full = forward_logits(model, **whole)
    with torch.no_grad():
        cache = returned_cache(model(**pieces[0], use_cache=True))
        for step, inputs in enumerate(pieces[1:], start=1):
            at = width + step - 1
            out = model(**inputs, **cache_kwargs(model, cache), use_cache=True)
            cache = returned_cache(out)
            for row in range(mask.shape[0]):
                mismatch = check_scores(result, batch_full[row, at : at + 1], out.logits[row].float(), result.tolerance)
                if not mismatch:
                    continue
                replay = Replay(
                    Side("the full forward", _forward(model, **whole), row=row),
                    Side(f"cached step {step}", _cached(model, pieces[: step + 1]), call=step, row=row, offset=at),
                    (at,),
                )
                raise _cache_failure(
                    f"left-padded batch, row {row} ({int((mask[row, :width] == 0).sum())} pad tokens), decoding step "
                    f"{step} (position {at}) differs from the full forward",
                    model,
                    tokenizer,
                    whole["input_ids"][row][mask[row] == 1],
                    ("batch", f"{len(texts)} prompts left-padded to {width}, then {appended} tokens"),
                    mismatch,
                    result,
                    replay,
                )


def assert_cache_effective(
    model: Any, tokenizer: Any, *, texts: Sequence[str] = DEFAULT_TEXTS[:2], max_new_tokens: int = 6
) -> CheckResult:
    """During cached ``generate``, every step after the prefill feeds exactly one new token per sequence.

    Counted with a forward pre-hook, not timed: a "cache" that recomputes the
    whole sequence gives the same tokens, only slower, and fails here.
    """
    __tracebackhide__ = True
    ids, mask, _ = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
    if cache_kind(model, ids[:, -2:]) is None:
        pytest.skip(f"{type(model).__name__} returns no cache (past_key_values or cache_params): nothing to reuse")
    fed: list[tuple[int, ...]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensor = kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
        if tensor is None and args:
            tensor = args[0]
        fed.append(tuple(tensor.shape[:2]))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        greedy_generate(
            model, tokenizer, ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
        )
    finally:
        handle.remove()
    steps = fed[1:]
    result = CheckResult("cache effectiveness", figure=("tokens/step", max((s[1] for s in steps), default=0)))
    result.note(
        f"prefill fed {fed[0][1] if fed else 0} tokens/sequence; {len(steps)} decoding steps fed {sorted({s[1] for s in steps})} tokens/sequence"
    )
    wrong = [(index + 1, shape) for index, shape in enumerate(steps) if shape != (ids.shape[0], 1)]
    if not fed or wrong:
        step, shape = wrong[0] if wrong else (0, None)
        raise failure(
            "cache not effective: decoding steps re-feed the sequence instead of one new token per sequence",
            model,
            figure=result.figure,
            details=[
                ("prompts", f"{len(texts)} prompts, left-padded to {ids.shape[1]} tokens"),
                ("forward calls", f"{len(fed)} for {max_new_tokens} new tokens"),
                ("first bad step", f"step {step} fed input of shape {shape}, expected ({ids.shape[0]}, 1)"),
                ("tokens per step", [shape[1] for shape in steps]),
                (
                    "likely cause",
                    "past_key_values ignored or not returned, or prepare_inputs_for_generation does not slice the input",
                ),
            ],
        )
    return result


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
    require_kv_cache(model, ids, "a static cache")
    cases = [("first call", ids, None), ("second call, longer prompt", encode(tokenizer, longer, model.device), None)]
    batch, mask, _ = padded_batch(tokenizer, texts, model.device, pad_id(model, tokenizer))
    cases.append((f"left-padded batch of {len(texts)}", batch, mask))
    for number, (label, prompt, prompt_mask) in enumerate(cases):
        kwargs = {"attention_mask": prompt_mask, "max_new_tokens": max_new_tokens, "config_fields": fields}
        if number == 0:
            generated = generate_or_skip("static-cache generation", model, tokenizer, prompt, **kwargs)
        else:
            generated = generate_or_fail(f"{result.invariant} ({label})", model, tokenizer, prompt, **kwargs)

        def rerun(prompt: Any = prompt, kwargs: dict = kwargs) -> Any:
            return generate_scored(model, tokenizer, prompt, **kwargs)

        assert_generation_matches_forward(
            model,
            tokenizer,
            prompt,
            generated,
            title=f"{result.invariant} differs ({label})",
            result=result,
            attention_mask=prompt_mask,
            details=[("prompt", text_of(tokenizer, prompt[-1]))],
            rerun=rerun,
        )
    result.note(f"{len(cases)} static-cache generations, compile {'on' if compile else 'off'}")
    return result
