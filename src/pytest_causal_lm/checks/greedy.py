"""Greedy-loop parity: "forward, argmax of the last position, append" equals ``model.generate``.

The tutorial's claim made testable: text generation is next-token
classification in a for-loop. Divergences at near-ties are reported, not failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kind,
    cache_kwargs,
    default_positions_differ,
    eos_ids,
    failure,
    pad_id,
    resolve_tolerance,
    returned_cache,
    text_of,
    token,
)

__all__ = [
    "GenerationConfigWarning",
    "NearTieWarning",
    "assert_greedy_parity",
    "assert_same_continuation",
    "compare_continuations",
    "generate_scored",
    "generation_config_deviations",
    "greedy_generate",
    "greedy_loop",
    "greedy_loop_along",
]

CHAT_MESSAGES: tuple[dict[str, str], ...] = ({"role": "user", "content": "How are you?"},)

# Settings of generation_config.json that change what greedy decoding returns, with their neutral values.
GREEDY_NEUTRAL: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "penalty_alpha": None,
    "dola_layers": None,
}


class NearTieWarning(UserWarning):
    """Two greedy sequences diverged where the top two scores were within the tolerance."""


class GenerationConfigWarning(UserWarning):
    """The checkpoint's generation_config.json changes what greedy generation returns."""


@dataclass
class GreedyRun:
    """Generated ids (prompt excluded) and the scores each step chose from."""

    tokens: list[int]
    step_scores: list[Any] = field(default_factory=list)


def greedy_loop(
    model: Any, input_ids: Any, *, max_new_tokens: int, stop_ids: set[int], use_cache: bool = False, scorer: Any = None
) -> GreedyRun:
    """The tutorial's loop on one sequence: forward, argmax of the last position, append, stop at eos.

    Without the cache every step re-reads the whole sequence; with it, every step
    after the first feeds only the newest token. ``scorer(ids) -> (vocab,) scores``
    replaces the model's forward (the classification-head loop uses it).
    """
    import torch

    ids = input_ids
    cache = None
    run = GreedyRun(tokens=[])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if scorer is not None:
                scores = scorer(ids)
            elif use_cache:
                out = model(
                    input_ids=ids if cache is None else ids[:, -1:], **cache_kwargs(model, cache), use_cache=True
                )
                cache = returned_cache(out)
                scores = out.logits[0, -1]
            else:
                scores = model(input_ids=ids, use_cache=False).logits[0, -1]
            scores = scores.float().cpu()
            next_id = int(scores.argmax())
            run.tokens.append(next_id)
            run.step_scores.append(scores)
            ids = torch.cat([ids, torch.tensor([[next_id]], device=ids.device)], dim=1)
            if next_id in stop_ids:
                break
    return run


def greedy_loop_along(model: Any, input_ids: Any, tokens: Sequence[int]) -> GreedyRun:
    """The uncached greedy loop, in one forward pass along ``tokens`` (one sequence).

    ``forward(prompt + tokens)`` gives at once the scores the loop would see at every
    step while its choices agree with ``tokens``, since a position's scores depend
    only on the tokens up to it (prefix causality, an invariant of its own). The run
    ends at the first step where the loop would choose otherwise: what a comparison
    with ``tokens`` needs, at one forward instead of one per token.
    """
    import torch

    ids = torch.cat([input_ids, torch.tensor([list(tokens)], dtype=input_ids.dtype, device=input_ids.device)], dim=1)
    with torch.no_grad():
        scores = model(input_ids=ids, use_cache=False).logits[0, input_ids.shape[1] - 1 :].float().cpu()
    run = GreedyRun(tokens=[])
    for step, step_scores in enumerate(scores[: max(len(tokens), 1)]):
        run.tokens.append(int(step_scores.argmax()))
        run.step_scores.append(step_scores)
        if step >= len(tokens) or run.tokens[-1] != tokens[step]:
            break
    return run


@contextmanager
def _clean_generation_config(model: Any, tokenizer: Any) -> Iterator[Any]:
    """Swap in a generation config with only the special tokens, so no checkpoint setting leaks in.

    transformers 5 fills every unset field of an explicit GenerationConfig from
    ``model.generation_config``; swapping it out is the only way to get plain greedy.
    """
    from transformers import GenerationConfig

    original = model.generation_config
    stop = sorted(eos_ids(model, tokenizer))
    clean = GenerationConfig(
        eos_token_id=stop or None,
        pad_token_id=pad_id(model, tokenizer),
        bos_token_id=getattr(original, "bos_token_id", None),
    )
    model.generation_config = clean
    try:
        yield clean
    finally:
        model.generation_config = original


@dataclass
class ScoredGeneration:
    """What ``generate`` returned: each row's new tokens (cut after its first eos), the raw scores of every
    step, ``(batch, steps, vocab)`` float32 on CPU, and the cache it ended with."""

    rows: list[list[int]]
    logits: Any
    cache: Any = None  # the cache generate returned


def generate_scored(
    model: Any,
    tokenizer: Any,
    input_ids: Any = None,
    *,
    max_new_tokens: int,
    attention_mask: Any = None,
    min_new_tokens: int | None = None,
    use_cache: bool = True,
    config_fields: dict[str, Any] | None = None,
    keep_scores: bool = True,
    **inputs: Any,
) -> ScoredGeneration:
    """``model.generate`` with an explicit greedy configuration, keeping the scores of every step.

    ``config_fields`` go into the GenerationConfig (``cache_implementation``, ``prompt_lookup_num_tokens``...);
    ``inputs`` go to ``generate`` itself (``inputs_embeds``, a cache from ``cache_kwargs``, ``assistant_model``).
    Without ``keep_scores`` (timing), no scores are kept and ``logits`` is None.
    """
    import torch
    from transformers import GenerationConfig

    stop = eos_ids(model, tokenizer)
    if attention_mask is None and input_ids is not None:
        attention_mask = torch.ones_like(input_ids)
    with _clean_generation_config(model, tokenizer) as clean, torch.no_grad():
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            use_cache=use_cache,
            eos_token_id=clean.eos_token_id,
            pad_token_id=clean.pad_token_id,
            return_dict_in_generate=True,
            output_logits=keep_scores,
            **(config_fields or {}),
        )
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **inputs)
    prompt_length = 0 if input_ids is None else input_ids.shape[1]  # from inputs_embeds, only new tokens return
    rows = []
    for row in out.sequences[:, prompt_length:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    logits = torch.stack([step.float().cpu() for step in out.logits], dim=1) if keep_scores else None
    return ScoredGeneration(rows, logits, returned_cache(out))


def greedy_generate(
    model: Any,
    tokenizer: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    attention_mask: Any = None,
    min_new_tokens: int | None = None,
    use_cache: bool = True,
    config_fields: dict[str, Any] | None = None,
    **inputs: Any,
) -> list[list[int]]:
    """``model.generate`` with an explicit greedy configuration; each row cut after its first eos."""
    return generate_scored(
        model,
        tokenizer,
        input_ids,
        max_new_tokens=max_new_tokens,
        attention_mask=attention_mask,
        min_new_tokens=min_new_tokens,
        use_cache=use_cache,
        config_fields=config_fields,
        keep_scores=False,
        **inputs,
    ).rows


def compare_continuations(
    model: Any,
    tokenizer: Any,
    prompt_ids: Any,
    reference: GreedyRun,
    other: Sequence[int],
    *,
    reference_label: str,
    other_label: str,
    tolerance: Tolerance,
    result: CheckResult | None = None,
    title: str = "greedy outputs diverge",
) -> None:
    """Fail unless ``other`` equals ``reference.tokens``, or first differs at a near-tie (then warn)."""
    __tracebackhide__ = True
    ref = reference.tokens
    other = list(other)
    if ref == other:
        return
    step = next((i for i, (a, b) in enumerate(zip(ref, other, strict=False)) if a != b), min(len(ref), len(other)))
    shared = text_of(tokenizer, list(prompt_ids[0].tolist()) + ref[:step])
    side_by_side = [
        (reference_label, text_of(tokenizer, ref[step:])),
        (other_label, text_of(tokenizer, other[step:])),
    ]
    if step < len(ref) and step < len(other) and step < len(reference.step_scores):
        scores = reference.step_scores[step]
        chosen, rival = float(scores[ref[step]]), float(scores[other[step]])
        margin = chosen - rival
        bound = tolerance.bound(chosen)
        tie_text = (
            f"{token(tokenizer, ref[step])} scores {chosen:.6g}, {token(tokenizer, other[step])} scores {rival:.6g}: "
            f"margin {margin:.3g} vs tolerance {bound:.3g} ({tolerance})"
        )
        if abs(margin) <= bound:
            message = (
                f"{title} at a near-tie (accepted): step {step} after {shared}: {reference_label} chose "
                f"{token(tokenizer, ref[step])}, {other_label} chose {token(tokenizer, other[step])}; {tie_text}"
            )
            warnings.warn(NearTieWarning(message), stacklevel=2)
            if result is not None:
                result.note(message)
                result.near_tie = True
            return
    else:
        tie_text = f"one sequence ends at step {step} ({'eos' if step < len(ref) or step < len(other) else 'length'})"
    cause = default_positions_differ(model, prompt_ids[:1], tolerance)
    raise failure(
        f"{title} at step {step} with a clear score margin",
        model,
        [
            ("prompt", text_of(tokenizer, prompt_ids[0])),
            ("shared prefix", shared),
            ("first divergence", f"step {step}"),
            *side_by_side,
            ("scores at divergence", tie_text),
            *([("likely cause", cause)] if cause else []),
        ],
        figure=("step", step),
    )


def assert_same_continuation(
    model: Any,
    tokenizer: Any,
    prompt_ids: Any,
    expected: Sequence[int],
    actual: Sequence[int],
    *,
    labels: tuple[str, str] = ("expected", "actual"),
    tolerance: Tolerance | None = None,
    title: str = "greedy continuations diverge",
) -> None:
    """Two greedy continuations of ``prompt_ids`` agree, or first differ where the model's own scores nearly tie."""
    __tracebackhide__ = True
    import torch

    ids = torch.cat([prompt_ids, torch.tensor([list(expected)], device=prompt_ids.device)], dim=1)
    with torch.no_grad():  # the uncached scores at every step of ``expected``, to judge a divergence by its margin
        scores = model(input_ids=ids).logits[0, prompt_ids.shape[1] - 1 : -1].float().cpu()
    compare_continuations(
        model,
        tokenizer,
        prompt_ids,
        GreedyRun(tokens=list(expected), step_scores=list(scores)),
        actual,
        reference_label=labels[0],
        other_label=labels[1],
        tolerance=resolve_tolerance(model, tolerance),
        title=title,
    )


def generation_config_deviations(model: Any) -> dict[str, Any]:
    """Settings of ``model.generation_config`` that make ``generate()`` differ from plain greedy."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    found = {}
    for name, neutral in GREEDY_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value in (None, [], {}) and neutral is None:
            continue
        if value is not None and value != neutral:
            found[name] = value
    return found


def default_prompts(tokenizer: Any, device: Any, texts: Sequence[str] = DEFAULT_TEXTS[:2]) -> list[tuple[str, Any]]:
    """Plain prompts, plus the chat-formatted one when the tokenizer has a chat template."""
    prompts = [(f"plain {text!r}", tokenizer(text, return_tensors="pt")["input_ids"].to(device)) for text in texts]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(CHAT_MESSAGES), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        import torch

        prompts.append((f"chat {CHAT_MESSAGES[0]['content']!r}", torch.tensor([list(ids)], device=device)))
    return prompts


def _report_generation_config(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, Any]],
    greedy: list[list[int]],
    max_new_tokens: int,
    result: CheckResult,
) -> None:
    """Say, separately from parity, whether the checkpoint's own generation_config changes greedy output."""
    import torch

    deviations = generation_config_deviations(model)
    if not deviations:
        return
    settings = ", ".join(f"{name}={value!r}" for name, value in deviations.items())
    if deviations.get("do_sample"):
        message = f"checkpoint generation_config sets {settings}: model.generate() samples by default, so its output is random; parity was checked against explicit greedy"
    else:
        changed = []
        for (label, ids), expected in zip(prompts, greedy, strict=True):
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens)
            own = out[0, ids.shape[1] :].tolist()[: len(expected)]
            if own != expected[: len(own)]:
                step = next(i for i, (a, b) in enumerate(zip(own, expected, strict=False)) if a != b)
                changed.append(
                    f"{label} from step {step}: greedy {token(tokenizer, expected[step])}, own config {token(tokenizer, own[step])}"
                )
        effect = (
            "changes greedy output: " + "; ".join(changed)
            if changed
            else "does not change greedy output on these prompts"
        )
        message = f"checkpoint generation_config sets {settings}; it {effect}"
    warnings.warn(GenerationConfigWarning(message), stacklevel=3)
    result.note(message)


def assert_greedy_parity(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 12,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """The hand-written greedy loop, without and with the cache, gives the same tokens as ``generate``.

    ``generate`` runs with an explicit greedy configuration. Plain prompts, plus a
    chat-formatted one when the tokenizer has a chat template. When the
    checkpoint's generation_config.json would change greedy output, a
    GenerationConfigWarning names the setting.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("greedy-loop parity", tolerance=tolerance)
    cases = default_prompts(tokenizer, model.device, *(() if prompts is None else (prompts,)))
    stop = eos_ids(model, tokenizer)
    keeps_kv_cache = cache_kind(model, cases[0][1]) == "kv"
    greedy_rows = []
    for label, ids in cases:
        generated = greedy_generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)[0]
        greedy_rows.append(generated)
        loops = [(greedy_loop_along(model, ids, generated), "loop without cache")]
        if keeps_kv_cache:
            cached = greedy_loop(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop, use_cache=True)
            uncached = loops[0][0]
            # scores compare only while both loops read the same tokens: up to and including the first divergence
            pairs = zip(uncached.tokens, cached.tokens, strict=False)
            shared = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            steps = zip(uncached.step_scores, cached.step_scores, strict=False)
            for scores_a, scores_b in list(steps)[: None if shared is None else shared + 1]:
                result.observe(scores_a, scores_b)
            loops.append((cached, "loop with cache"))
        elif not result.notes or "no past_key_values" not in result.notes[-1]:
            result.note("the model returns no past_key_values (recurrent/state-space cache): cached loop not run")
        for loop, name in loops:
            compare_continuations(
                model,
                tokenizer,
                ids,
                loop,
                generated,
                reference_label=name,
                other_label="model.generate",
                tolerance=tolerance,
                result=result,
                title=f"greedy-loop parity violated ({label})",
            )
    _report_generation_config(model, tokenizer, cases, greedy_rows, max_new_tokens, result)
    return result
