"""The generation machinery every family uses: the tutorial's greedy loop, ``generate`` with an explicit
greedy config and the scores of every step, the comparison of two continuations (a divergence at a near-tie is
reported, not failed), the comparison of generated steps with one forward pass, and the line between a path
transformers refuses (a skip) and a path that breaks (a failure).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    eos_ids,
    error_failure,
    failure,
    first_difference,
    forward_logits,
    mismatch_failure,
    pad_id,
    resolve_tolerance,
    returned_cache,
    text_of,
    token,
    transformers_refusal,
    until_eos,
)
from ._localise import Replay, Side

__all__ = [
    "CHAT_MESSAGES",
    "GREEDY_NEUTRAL",
    "GreedyRun",
    "NearTieWarning",
    "ScoredGeneration",
    "assert_generation_matches_forward",
    "assert_same_continuation",
    "compare_continuations",
    "default_prompts",
    "generate_or_fail",
    "generate_or_skip",
    "generate_scored",
    "greedy_generate",
    "greedy_loop",
    "greedy_loop_along",
    "require_kv_cache",
    "static_cache_fields",
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


# transformers 5.25's own assisted decoding calls the assistant's generate with a generation_config and
# max_new_tokens/min_new_tokens side by side, which its own deprecation then logs into the user's run.
_ASSISTANT_CALL_DEPRECATION = "Passing `generation_config` together with generation-related arguments"


class _DropRecord:
    """A logging filter that drops the records starting with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


@contextmanager
def _assistant_calls_quiet(active: bool) -> Iterator[None]:
    """While the plugin runs assisted decoding, drop the deprecation transformers logs about its own call of the
    assistant (no argument of the plugin's causes it); everything else it logs passes."""
    import logging

    if not active:
        yield
        return
    logger = logging.getLogger("transformers.generation.utils")
    dropped = _DropRecord(_ASSISTANT_CALL_DEPRECATION)
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


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

    ``config_fields`` go into the GenerationConfig (``cache_implementation``, ``prompt_lookup_num_tokens``, or
    ``do_sample`` with its settings);
    ``inputs`` go to ``generate`` itself (``inputs_embeds``, a cache from ``cache_kwargs``, ``assistant_model``).
    Without ``keep_scores`` (timing), no scores are kept and ``logits`` is None.
    """
    import torch
    from transformers import GenerationConfig

    stop = eos_ids(model, tokenizer)
    if attention_mask is None and input_ids is not None:
        attention_mask = torch.ones_like(input_ids)
    with _clean_generation_config(model, tokenizer) as clean, torch.no_grad():
        greedy = {"do_sample": False, "num_beams": 1}
        config = GenerationConfig(
            **{**greedy, **(config_fields or {})},
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            use_cache=use_cache,
            eos_token_id=clean.eos_token_id,
            pad_token_id=clean.pad_token_id,
            return_dict_in_generate=True,
            output_logits=keep_scores,
        )
        with _assistant_calls_quiet("assistant_model" in inputs):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **inputs)
    prompt_length = 0 if input_ids is None else input_ids.shape[1]  # from inputs_embeds, only new tokens return
    rows = [until_eos(row, stop) for row in out.sequences[:, prompt_length:].tolist()]
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
    step = first_difference(ref, other) or 0
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


def default_prompts(tokenizer: Any, device: Any, texts: Sequence[str] = DEFAULT_TEXTS[:2]) -> list[tuple[str, Any]]:
    """Plain prompts, plus the chat-formatted one when the tokenizer has a chat template."""
    prompts = [(f"plain {text!r}", tokenizer(text, return_tensors="pt")["input_ids"].to(device)) for text in texts]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(CHAT_MESSAGES), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        import torch

        prompts.append((f"chat {CHAT_MESSAGES[0]['content']!r}", torch.tensor([list(ids)], device=device)))
    return prompts


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
    rerun: Callable[[], Any] | None = None,
) -> None:
    """Every step's scores of ``generated`` equal one forward pass over the prompt and the generated tokens.

    A row is compared up to and including its first eos; a padded batch gets its mask and positions counted
    from the mask, as ``generate`` passes them. ``rerun`` repeats the generation (one forward per step) so a
    failure can name the first module that departs.
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
            replay = _step_replay(model, (ids, kwargs), rerun, index, start, mismatch.first_position)
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
                replay=replay,
            )


def _step_replay(model: Any, full: tuple[Any, dict], rerun: Any, row: int, start: int, step: int) -> Replay | None:
    """Generate's ``step`` (its ``step``-th forward: the prefill is 0) against the one forward pass over ``full``."""
    if rerun is None:
        return None
    ids, kwargs = full
    return Replay(
        Side("one forward pass", lambda: model(input_ids=ids, **kwargs), row=row),
        Side(f"generate's step {step}", rerun, call=step, row=row, offset=0 if step == 0 else start + step),
        (start + step,),
    )


def require_kv_cache(model: Any, input_ids: Any, what: str) -> None:
    kind = cache_kind(model, input_ids)
    if kind != "kv":
        held = "a recurrent/state-space cache (cache_params)" if kind == "recurrent" else "no past_key_values"
        pytest.skip(f"{type(model).__name__} returns {held}; {what} needs a key/value cache")


def generate_or_skip(path: str, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> ScoredGeneration:
    """``generate_scored`` on ``path`` (``"static-cache generation"``...), skipping with transformers' own words
    when transformers refuses the path for this model (``transformers_refusal``); any other exception is a
    failure naming it and the module it came from."""
    try:
        return generate_scored(model, tokenizer, *args, **kwargs)
    except Exception as exc:
        words = transformers_refusal(exc)
        if words is None:
            raise error_failure(exc, model, path) from None
    pytest.skip(f"transformers refuses {path} for {type(model).__name__}: {words}")


def generate_or_fail(title: str, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> ScoredGeneration:
    """``generate_scored`` on a path that already worked once: an exception now is the bug (a stale state)."""
    try:
        return generate_scored(model, tokenizer, *args, **kwargs)
    except Exception as exc:
        raise error_failure(
            exc,
            model,
            title,
            title=f"{title}: generate raised {type(exc).__name__} after an earlier call on this path succeeded",
            why=("likely cause", "state kept from the earlier call (a cache not reset)"),
        ) from None


def _import_what_inductor_imports() -> None:
    """torch's inductor imports ``torch.utils.mkldnn`` at the first CPU compile, whose classes still use
    ``torch.jit.script_method`` and so log 14 DeprecationWarnings of torch's own making into the user's run:
    imported here once, with exactly that warning silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script_method` is deprecated", DeprecationWarning)
        import torch.utils.mkldnn  # noqa: F401


def static_cache_fields(*, compile: bool) -> dict[str, Any]:
    """GenerationConfig fields of static-cache generation, compiled on every device or not at all."""
    if not compile:
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    _import_what_inductor_imports()

    compile_config = CompileConfig()  # transformers' own choice: reduce-overhead (CUDA graphs where available)
    compile_config._compile_all_devices = True  # transformers compiles by itself only on accelerators
    return {"cache_implementation": "static", "compile_config": compile_config}
