"""Chat turns judged by behaviour, not by the template's source text.

The template is rendered with and without the assistant's answer: the markers
it writes must be single registered tokens, the generation prompt must be how
an answered turn begins, and the token that ends an assistant turn must stop
``generate``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from ._common import eos_ids, failure, pad_id
from .chat import render, require_chat_template

__all__ = [
    "ANSWER",
    "assert_chat_markers_are_tokens",
    "assert_generation_prompt_opens_the_answer",
    "assert_turn_terminator_stops_generation",
]

ANSWER = "Fine, thanks."
USER_TURN: tuple[dict[str, str], ...] = ({"role": "user", "content": "Hi dog, how are you?"},)
# Markup a template writes around turns: <|im_start|>, <start_of_turn>, </s>, <think>, [INST], <｜User｜>.
_ANGLE_MARKER = re.compile(r"<[|｜]?/?[A-Za-z_][\w.:-]*[|｜]?>")
_BRACKET_MARKER = re.compile(r"\[/?[A-Z][A-Z_]{1,30}\]")
# A reasoning block a thinking template writes before the answer, or prefills at the end of a prompt.
_REASONING_BLOCK = re.compile(r"^\s*<(think|thinking|reasoning)>.*?</\1>\s*", re.DOTALL)
_PREFILLED_REASONING = re.compile(r"<(think|thinking|reasoning)>[^<]*</\1>\s*$")


def markers_in(tokenizer: Any, rendered: str) -> list[str]:
    """The markup the template wrote; bracket markers only where the vocabulary registers some."""
    found = dict.fromkeys(_ANGLE_MARKER.findall(rendered))
    registered = [str(t) for t in getattr(tokenizer, "added_tokens_encoder", {})]
    if any(_BRACKET_MARKER.fullmatch(token) for token in registered):
        found.update(dict.fromkeys(_BRACKET_MARKER.findall(rendered)))
    return list(found)


def assert_chat_markers_are_tokens(
    model: Any, tokenizer: Any, *, messages: Sequence[Mapping[str, str]] = USER_TURN
) -> None:
    """Every marker the template writes (``<|im_start|>``, ``<start_of_turn>``, ``<think>``, ...) is one
    registered special or added token, inside the embedding rows, and stays one token inside the rendered chat."""
    __tracebackhide__ = True
    require_chat_template(tokenizer)
    answered = [*messages, {"role": "assistant", "content": ANSWER}]
    rendered = render(tokenizer, answered, False) + render(tokenizer, messages, True)
    rendered_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    registered = set(getattr(tokenizer, "added_tokens_encoder", {}).values()) | set(tokenizer.all_special_ids)
    rows = model.get_input_embeddings().weight.shape[0]
    problems: list[tuple[str, object]] = []
    for marker in markers_in(tokenizer, rendered):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        if len(ids) != 1:
            problems.append((marker, f"encodes to {len(ids)} tokens {list(zip(pieces, ids, strict=True))}"))
        elif ids[0] not in registered:
            problems.append(
                (marker, f"id {ids[0]} is an ordinary vocabulary entry, not a registered special/added token")
            )
        elif ids[0] >= rows:
            problems.append((marker, f"id {ids[0]} is past the {rows} input embedding rows"))
        elif rendered_ids.count(ids[0]) != rendered.count(marker):
            problems.append(
                (
                    marker,
                    f"written {rendered.count(marker)} times, tokenized as id {ids[0]} {rendered_ids.count(ids[0])} times",
                )
            )
    if problems:
        raise failure(
            f"chat markers are not single tokens: {', '.join(repr(m) for m, _ in problems)}",
            model,
            [
                ("rendered", repr(rendered[:160])),
                *problems,
                ("likely cause", "added/special tokens lost in a conversion (tokenizer.json added_tokens)"),
            ],
            figure=("markers", len(problems)),
        )


def _prompt_and_answer(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], kwargs: dict[str, Any]
) -> tuple[str, str]:
    """(the conversation with the generation prompt, the same conversation answered by the assistant)."""
    prompted = render(tokenizer, messages, True, **kwargs)
    answered = render(tokenizer, [*messages, {"role": "assistant", "content": ANSWER}], False, **kwargs)
    return prompted, answered


def assert_generation_prompt_opens_the_answer(
    model: Any,
    tokenizer: Any,
    *,
    messages: Sequence[Mapping[str, str]] = USER_TURN,
    template_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """``add_generation_prompt=True`` renders exactly how an answered conversation begins its assistant turn.

    The answered conversation must start with the prompted one and continue with
    the assistant's content, whatever the template's source says. A reasoning
    block is allowed before the answer, and prefilled at the end of the prompt
    (thinking templates). Templates without an assistant opener (Mistral-style)
    pass; one that never writes the opener into the prompt fails.
    """
    __tracebackhide__ = True
    require_chat_template(tokenizer)
    kwargs = dict(template_kwargs or {})
    prompted, answered = _prompt_and_answer(tokenizer, messages, kwargs)
    prompted = _PREFILLED_REASONING.sub("", prompted)
    if not answered.startswith(prompted):
        part = next((i for i, (a, b) in enumerate(zip(prompted, answered, strict=False)) if a != b), len(answered))
        start = max(0, part - 12)
        problem = (
            f"the answered conversation does not start with the prompt: from character {start} the prompt has "
            f"{prompted[start : part + 30]!r}, the answered one {answered[start : part + 30]!r}"
        )
    else:
        rest = answered[len(prompted) :]
        if _REASONING_BLOCK.sub("", rest, count=1).lstrip(" ").startswith(ANSWER):
            return
        problem = f"after the prompt, an answered turn writes {rest[: max(rest.find(ANSWER), 0)]!r} before the answer"
    raise failure(
        "the generation prompt is not how the template opens an assistant turn: the model would be asked to "
        "write the turn's opener itself",
        model,
        [("prompt ends", repr(prompted[-60:])), ("problem", problem), ("template kwargs", kwargs or "none")],
    )


def assert_turn_terminator_stops_generation(
    model: Any,
    tokenizer: Any,
    *,
    messages: Sequence[Mapping[str, str]] = USER_TURN,
    template_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """The token the template writes after an assistant message stops ``generate``.

    Proven by generating: the terminator is forced as the first new token with the
    checkpoint's own generation config, and generation must end there. Otherwise
    the model runs on into the next turn.
    """
    __tracebackhide__ = True
    require_chat_template(tokenizer)
    prompted, answered = _prompt_and_answer(tokenizer, messages, dict(template_kwargs or {}))
    after = answered[answered.rfind(ANSWER) + len(ANSWER) :] if ANSWER in answered else ""
    terminator = _first_special(tokenizer, after)
    if terminator is None:
        pytest.skip(f"the template ends an assistant turn with no special token ({after!r}): nothing to stop at")
    prompt_ids = tokenizer(prompted + ANSWER, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generated = _generate_forcing(model, tokenizer, prompt_ids.to(model.device), terminator)
    if len(generated) == 1:
        return
    name = tokenizer.convert_ids_to_tokens([terminator])[0]
    raise failure(
        f"generate does not stop at {name!r} (id {terminator}), the token that ends an assistant turn",
        model,
        [
            ("template ends a turn with", repr(after[:40])),
            ("generation_config.eos_token_id", getattr(model.generation_config, "eos_token_id", None)),
            ("stop ids", sorted(eos_ids(model, tokenizer))),
            ("generated after forcing it", tokenizer.convert_ids_to_tokens(generated)),
            ("likely cause", _why_no_stop(model, tokenizer)),
        ],
        figure=("tokens after", len(generated) - 1),
    )


def _why_no_stop(model: Any, tokenizer: Any) -> str:
    if not eos_ids(model, tokenizer):
        return "the checkpoint declares no eos at all (tokenizer, config, generation_config): generation never stops"
    return "generation_config.json lists only the base model's eos: add the turn terminator to eos_token_id"


def _first_special(tokenizer: Any, text: str) -> int | None:
    """The first registered special/added token in ``text``'s ids, or None."""
    registered = set(getattr(tokenizer, "added_tokens_encoder", {}).values()) | set(tokenizer.all_special_ids)
    return next((i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in registered), None)


def _generate_forcing(model: Any, tokenizer: Any, prompt_ids: Any, token_id: int, max_new_tokens: int = 3) -> list[int]:
    """``model.generate`` with the checkpoint's own config, greedy, ``token_id`` forced at every step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, token_id] = 0.0
            return forced

    with torch.no_grad():
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            logits_processor=LogitsProcessorList([Force()]),
            pad_token_id=pad_id(model, tokenizer),
        )
    return out[0, prompt_ids.shape[1] :].tolist()
