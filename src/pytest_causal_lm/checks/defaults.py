"""The checkpoint's own generation defaults: a user's first ``generate`` call works and does what it says.

Every other generation check passes an explicit greedy config. A user's first script does not:
``model.generate(**tokenizer(prompt, return_tensors="pt"))`` runs on ``generation_config.json`` alone. A
``temperature`` of 0 with sampling on (OpenAI's spelling of greedy) crashes it, sampling settings next to
``do_sample: false`` are silently ignored, and a stop id copied from another model's config never stops.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from ._common import CheckResult, failure, text_of
from .greedy import GREEDY_NEUTRAL

__all__ = ["assert_generation_defaults"]

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
