"""Generation: the tutorial's greedy loop equals ``model.generate``, and every other way into ``generate``
scores each step as one forward pass over the same tokens.

Greedy-loop parity makes the tutorial's claim testable: text generation is next-token classification in a
for-loop. Continuing from a returned cache and assisted decoding are other paths into ``generate``, with their
own bugs; the checkpoint's own ``generation_config.json`` decides what a user's first plain call does.
Divergences at near-ties are reported, not failed.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kind,
    cache_kwargs,
    encode,
    eos_ids,
    failure,
    first_difference,
    resolve_tolerance,
    text_of,
    token,
)
from ._generation import (
    GREEDY_NEUTRAL,
    assert_generation_matches_forward,
    compare_continuations,
    default_prompts,
    generate_or_skip,
    generate_scored,
    greedy_generate,
    greedy_loop,
    greedy_loop_along,
    require_kv_cache,
)

__all__ = [
    "PROMPT",
    "REPEATING_TEXT",
    "GenerationConfigWarning",
    "assert_assisted_decoding_matches",
    "assert_continuation_matches",
    "assert_generation_defaults",
    "assert_greedy_parity",
    "generation_config_deviations",
]


class GenerationConfigWarning(UserWarning):
    """The checkpoint's generation_config.json changes what greedy generation returns."""


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
                step = first_difference(own, expected[: len(own)]) or 0
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


# A prompt that repeats itself, so prompt-lookup decoding finds n-grams to propose and verifies them.
REPEATING_TEXT = (
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick brown"
)


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
    require_kv_cache(model, ids, "continuing from a returned cache")
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
    require_kv_cache(model, ids, "assisted decoding")
    repeating = encode(tokenizer, repeating_text, model.device)
    cases = [
        ("assisted by itself", ids, {}, {"assistant_model": model}),
        ("prompt lookup", repeating, {"prompt_lookup_num_tokens": 3}, {}),
    ]
    for label, prompt, fields, inputs in cases:
        generated = generate_or_skip(
            f"{label} decoding",
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


PROMPT = "Hi dog how are you?"


_STOP_IDS = ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")


def assert_generation_defaults(model: Any, tokenizer: Any, *, prompt: str = PROMPT, seed: int = 0) -> CheckResult:
    """``generation_config`` passes transformers' strict validation, names no id outside the vocabulary, and a
    plain ``generate`` on it alone (seeded when it samples) returns new tokens. Notes say which defaults change
    what a plain call returns (sampling, a ``repetition_penalty``, a 20-token ``max_length``, ...)."""
    __tracebackhide__ = True
    import torch

    config = model.generation_config
    problems = [*_validation_problems(config), *_ids_outside_vocabulary(model, config)]
    if problems:
        raise failure(
            "the checkpoint's generation_config.json has settings generate ignores or cannot use",
            model,
            [*problems, ("fix", "edit generation_config.json (model.generation_config.save_pretrained)")],
        )
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    try:  # generate's own warnings go to the notes: under -W error they would stop the user's call, not ours
        with torch.no_grad(), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            output = model.generate(**inputs)
    except Exception as exc:
        raise failure(
            "a plain generate() with the checkpoint's own defaults raises",
            model,
            [("call", f"model.generate(**tokenizer({prompt!r}, return_tensors='pt'))"), ("error", _first_line(exc))],
        ) from None
    new = output[0, inputs["input_ids"].shape[1] :]
    result = CheckResult("generation defaults")
    if len(new) == 0:
        raise failure(
            "a plain generate() with the checkpoint's own defaults returns no new token",
            model,
            [("max_length", config.max_length), ("max_new_tokens", config.max_new_tokens)],
        )
    result.note(f"a plain generate() gave {len(new)} new tokens: {text_of(tokenizer, new)}")
    for note in [*_output_changing_defaults(config, len(new)), *_warned(warned)]:
        result.note(note)
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _validation_problems(config: Any) -> list[tuple[str, object]]:
    """transformers' own strict validation: settings it would ignore or reject, one row each."""
    try:
        copy.deepcopy(config).validate(strict=True)
    except ValueError as exc:
        lines = [line.strip("- ").strip() for line in str(exc).splitlines() if line.strip()]
        issues = [line for line in lines if "`" in line] or lines
        return [("validation", issue) for issue in issues]
    return []


def _ids_outside_vocabulary(model: Any, config: Any) -> list[tuple[str, object]]:
    vocab = model.config.get_text_config().vocab_size
    rows: list[tuple[str, object]] = []
    for name in _STOP_IDS:
        value = getattr(config, name, None)
        ids = value if isinstance(value, list | tuple) else [value]
        outside = [i for i in ids if isinstance(i, int) and not 0 <= i < vocab]
        if outside:
            rows.append((name, f"{value}: {outside} outside the vocabulary of {vocab} (never generated, never stops)"))
    return rows


def _warned(records: list[Any]) -> list[str]:
    """generate's warnings, once each and by their first sentence (the max_length one is covered by a note)."""
    texts = [str(record.message).strip().split(". ")[0] for record in records]
    return [f"generate warned: {text}" for text in dict.fromkeys(texts) if text and "max_length" not in text]


def _output_changing_defaults(config: Any, new_tokens: int) -> list[str]:
    """Notes on the defaults that make a plain call differ from greedy decoding of as many tokens as asked."""
    notes = []
    if config.do_sample:
        settings = ", ".join(f"{n}={getattr(config, n)}" for n in ("temperature", "top_p", "top_k", "min_p"))
        notes.append(f"samples by default ({settings}): a plain call's text changes from run to run")
    if config.max_new_tokens is None and config.max_length in (None, 20):  # unset: 5.x reads None, 5.0 reads 20
        notes.append(
            f"no max_new_tokens or max_length set: a plain call stops at transformers' default length ({new_tokens} "
            "new tokens here)"
        )
    for name, neutral in GREEDY_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if name != "do_sample" and value != neutral and value is not None:  # sampling has its own note above
            notes.append(f"{name}={value}: a plain call's text differs from greedy decoding")
    return notes
