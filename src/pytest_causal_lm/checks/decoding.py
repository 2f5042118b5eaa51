"""What users read: the text a chat UI shows after ``decode(..., skip_special_tokens=True)``, whole or streamed.

Every chat UI and pipeline decodes the answer with ``skip_special_tokens=True``: a marker the template writes
that is registered as an ordinary added token (not special) survives it and shows up as ``<|im_end|>`` in the
user's text. Streaming UIs decode a growing list of ids (transformers' ``TextStreamer``, which restarts after
each newline): a decoder whose output depends on where decoding starts shows users other text than
``decode`` of the whole answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._common import CheckResult, failure
from .chat import render, require_chat_template
from .tokenizer import ROUND_TRIP_CORPUS
from .turns import ANSWER, USER_TURN, markers_in

__all__ = ["STREAMED_TEXTS", "assert_decoded_answer_has_no_markers", "assert_streamed_decode_matches"]

_REASONING_MARKER = re.compile(r"</?(think|thinking|reasoning)>")
STREAMED_TEXTS: tuple[str, ...] = (ANSWER, *ROUND_TRIP_CORPUS)


def _answer_ids(tokenizer: Any) -> tuple[list[int], str]:
    """The ids a model generates for the assistant's answer (answer, terminator and what follows), and the
    whole answered conversation's text."""
    prompted = render(tokenizer, list(USER_TURN), True)
    answered = render(tokenizer, [*USER_TURN, {"role": "assistant", "content": ANSWER}], False)
    tail = answered[len(prompted) :] if answered.startswith(prompted) else answered[answered.rfind(ANSWER) :]
    return tokenizer(tail, add_special_tokens=False)["input_ids"], answered


def assert_decoded_answer_has_no_markers(model: Any, tokenizer: Any) -> CheckResult:
    """``decode(answer ids, skip_special_tokens=True)`` of a templated assistant answer (and of the whole
    conversation) shows no marker the template writes, and still shows the answer."""
    __tracebackhide__ = True
    require_chat_template(tokenizer)
    answer_ids, answered = _answer_ids(tokenizer)
    conversation_ids = tokenizer(answered, add_special_tokens=False)["input_ids"]
    written = markers_in(tokenizer, answered)
    # a reasoning block stays visible by design (Qwen3 registers <think> as non-special): UIs parse it out
    markers = [marker for marker in written if not _REASONING_MARKER.fullmatch(marker)]
    for what, ids in (("the assistant's answer", answer_ids), ("the whole conversation", conversation_ids)):
        shown = tokenizer.decode(ids, skip_special_tokens=True)
        left = [marker for marker in markers if marker in shown]
        if left or ANSWER not in shown:
            raise failure(
                f"decode(skip_special_tokens=True) of {what} shows "
                + (f"template markers {left}" if left else "no answer"),
                model,
                [
                    ("decoded", repr(shown[-200:])),
                    *((m, _registration(tokenizer, m)) for m in left),
                    ("fix", "register every marker as a special token (special=True in tokenizer.json added_tokens)"),
                ],
                figure=("markers", len(left)),
            )
    result = CheckResult("decoded answer")
    result.note(f"markers hidden by skip_special_tokens: {', '.join(markers) or 'none written'}")
    if len(markers) < len(written):
        result.note(f"reasoning markers left visible by design: {', '.join(sorted(set(written) - set(markers)))}")
    return result


def _registration(tokenizer: Any, marker: str) -> str:
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return f"not one token: {ids}"
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])  # the flag decode() obeys
    if added is None:
        return f"id {ids[0]}, an ordinary vocabulary entry, not an added token"
    return f"id {ids[0]}, an added token with special={added.special} (decode keeps tokens that are not special)"


def streamed_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """What transformers' ``TextStreamer`` shows for ``ids`` fed one at a time (its own logic, run as is)."""
    import torch
    from transformers import TextStreamer

    pieces: list[str] = []

    class Collecting(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    streamer = Collecting(tokenizer, skip_special_tokens=True)
    for token_id in ids:
        streamer.put(torch.tensor([token_id]))
    streamer.end()
    return "".join(pieces)


def assert_streamed_decode_matches(model: Any, tokenizer: Any, *, texts: Sequence[str] = STREAMED_TEXTS) -> CheckResult:
    """``TextStreamer`` fed one token at a time shows what one ``decode(..., skip_special_tokens=True)`` of the
    same ids shows: on a chat answer and the round-trip corpus (code indentation after newlines, multi-byte
    characters split across tokens, repeated spaces)."""
    __tracebackhide__ = True
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        streamed = streamed_text(tokenizer, ids)
        if streamed == whole:
            continue
        first = next((i for i, (a, b) in enumerate(zip(streamed, whole, strict=False)) if a != b), None)
        first = min(len(streamed), len(whole)) if first is None else first
        line_start = whole.rfind("\n", 0, first) + 1
        raise failure(
            f"streamed text differs from decode() of the same ids from character {first}",
            model,
            [
                ("text", repr(text[:80])),
                ("decode()", repr(whole[line_start : first + 30])),
                ("streamed", repr(streamed[line_start : first + 30])),
                ("likely cause", _stream_cause(tokenizer, whole, first)),
            ],
            figure=("character", first),
        )
    return CheckResult("streamed decode")


def _stream_cause(tokenizer: Any, whole: str, first: int) -> str:
    if whole.rfind("\n", 0, first + 1) >= 0 and "\n" in whole[: first + 1]:
        return (
            "TextStreamer restarts decoding after each newline, and this tokenizer's decoder changes the start of a "
            "decode (a Strip or prefix-space step, as SentencePiece decoders have): streamed lines lose text"
        )
    return "the decoder's output for a prefix of the ids is not a prefix of its output for all of them"
