"""Chat template: tokenizing through the template equals tokenizing its text, one BOS, a proper generation prompt."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from ._common import CheckResult, failure, text_of

__all__ = ["ChatTemplateWarning", "assert_chat_template_consistent"]

MESSAGES: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi dog, how are you?"},
)


class ChatTemplateWarning(UserWarning):
    """A chat-template pitfall that is not a bug in the checkpoint itself."""


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids[0] if ids and isinstance(ids[0], list) else ids


def assert_chat_template_consistent(
    model: Any,
    tokenizer: Any,
    *,
    messages: Sequence[Mapping[str, str]] = MESSAGES,
    template_kwargs: Mapping[str, Any] | None = None,
) -> CheckResult:
    """``apply_chat_template(tokenize=True)`` equals tokenizing the rendered text without added specials,
    with no doubled BOS; ``add_generation_prompt=True`` ends with the assistant turn opener; extra template
    kwargs (``enable_thinking=False`` by default) reach templates that use them. Skips without a template."""
    __tracebackhide__ = True
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        pytest.skip("the tokenizer has no chat template")
    template_source = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
    template_kwargs = {"enable_thinking": False} if template_kwargs is None else dict(template_kwargs)
    messages = [dict(m) for m in messages]
    result = CheckResult("chat template")

    def render(msgs: list[dict[str, str]], generation_prompt: bool, **kwargs: Any) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)

    try:
        render(messages, True)
    except Exception as exc:  # templates that reject a system turn (Gemma, Mistral) get the user turn alone
        if messages[0]["role"] != "system":
            raise
        messages = messages[1:]
        result.note(f"template rejects a system message ({type(exc).__name__}); checked without it")
    rendered = render(messages, True)
    via_template = _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    via_text = _ids(tokenizer(rendered, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    problems: list[tuple[str, object]] = []
    if bos is not None and via_template[:2] == [bos, bos]:
        problems.append(
            ("doubled BOS", f"apply_chat_template ids start with {tokenizer.bos_token!r} twice: {via_template[:6]}")
        )
    if via_template != via_text:
        first = next(
            (i for i, (a, b) in enumerate(zip(via_template, via_text, strict=False)) if a != b),
            min(len(via_template), len(via_text)),
        )
        problems.append(
            (
                "template ids vs text ids",
                f"differ from position {first}: apply_chat_template gives {via_template[first : first + 6]}, "
                f"tokenizer(rendered, add_special_tokens=False) gives {via_text[first : first + 6]}",
            )
        )
    with_default_specials = _ids(tokenizer(rendered))
    if bos is not None and with_default_specials[:2] == [bos, bos] and via_template[:1] == [bos]:
        message = (
            "the template writes BOS and the tokenizer adds another: tokenize rendered chat text with "
            "add_special_tokens=False (or use apply_chat_template(tokenize=True)) to avoid a doubled BOS"
        )
        warnings.warn(ChatTemplateWarning(message), stacklevel=2)
        result.note(message)

    if "add_generation_prompt" in template_source:
        without_prompt = render(messages, False)
        opener = rendered[len(without_prompt) :] if rendered.startswith(without_prompt) else None
        answered = render([*messages, {"role": "assistant", "content": "Fine, thanks."}], False)
        if not opener:
            problems.append(
                (
                    "generation prompt",
                    f"add_generation_prompt=True adds nothing after the conversation: {rendered[-60:]!r}",
                )
            )
        elif not answered.startswith(rendered):
            problems.append(
                (
                    "generation prompt",
                    f"{opener!r} is not how the template opens an assistant turn: an answered conversation "
                    f"continues {answered[len(without_prompt) : len(without_prompt) + len(opener) + 20]!r}",
                )
            )
    for name, value in template_kwargs.items():
        if name not in template_source:
            result.note(f"template does not use {name}; not checked")
            continue
        if render(messages, True, **{name: value}) == rendered:
            problems.append((name, f"passing {name}={value!r} does not change the rendered prompt"))
    if problems:
        raise failure(
            "chat template is inconsistent",
            model,
            [("messages", [m["role"] for m in messages]), ("rendered", text_of(tokenizer, via_text)), *problems],
        )
    return result
