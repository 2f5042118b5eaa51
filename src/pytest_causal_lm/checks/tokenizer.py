"""Tokenizer invariants: text survives encode/decode, and a plain encode adds only what generation needs.

Many conversion bugs live in the tokenizer, not the weights: a prefix space
that shifts every id, a lost byte fallback, an eos appended to every prompt.

Decoded and streamed answers, what users read: the text a chat UI shows after ``decode(..., skip_special_tokens=True)``, whole or streamed.

Every chat UI and pipeline decodes the answer with ``skip_special_tokens=True``: a marker the template writes
that is registered as an ordinary added token (not special) survives it and shows up as ``<|im_end|>`` in the
user's text. Streaming UIs decode a growing list of ids (transformers' ``TextStreamer``, which restarts after
each newline): a decoder whose output depends on where decoding starts shows users other text than
``decode`` of the whole answer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from ._common import CheckResult, failure, first_difference
from .chat import ANSWER, USER_TURN, markers_in, render, require_chat_template

__all__ = [
    "ROUND_TRIP_CORPUS",
    "STREAMED_TEXTS",
    "assert_decoded_answer_has_no_markers",
    "assert_prompt_special_tokens",
    "assert_streamed_decode_matches",
    "assert_tokenizer_round_trip",
    "template_writes_bos",
]


ROUND_TRIP_CORPUS: tuple[str, ...] = (
    "Hi dog how are you?",
    'def greet(name):\n    if name:\n        return f"Hello, {name}!"\n\treturn None\n',
    "Numbers: 0 7 42 3.14159 -273.15 1,000,000 2026-11-23 0x1F",
    "Unicode: café, naïve, Straße, 東京, Москва, ελληνικά, العربية",
    "Emoji: 👋🐶 🎉 👨‍👩‍👧 ✅",
    "  leading spaces, and   repeated   spaces  ",
    " a single leading space",
    "line one\nline two\n\n\nafter blank lines\r\nand a Windows line end",
)

# Normalizations a tokenizer may declare on purpose (uncased and accent-stripping vocabularies).
# Pre-tokenizers that drop whitespace by design (WordPiece/BERT style): spacing is not kept.
_WHITESPACE_DROPPING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def _backend_parts(tokenizer: Any) -> tuple[set[str], set[str]]:
    """The normalizer and pre-tokenizer types of a fast tokenizer (empty sets for others)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set(), set()
    spec = json.loads(backend.to_str())

    def types(node: Any) -> set[str]:
        if isinstance(node, dict):
            return {str(node.get("type"))} | {t for value in node.values() for t in types(value)}
        if isinstance(node, list):
            return {t for value in node for t in types(value)}
        return set()

    return types(spec.get("normalizer")), types(spec.get("pre_tokenizer"))


def _expected_text(text: str, normalizers: set[str], pre_tokenizers: set[str]) -> str:
    """What a lossless round trip gives back, after the normalizations the tokenizer declares."""
    if normalizers & {"NFKC", "BertNormalizer"}:
        text = unicodedata.normalize("NFKC", text)
    if normalizers & {"StripAccents", "BertNormalizer"}:
        text = "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")
    if normalizers & {"Lowercase", "BertNormalizer"}:
        text = text.lower()
    if pre_tokenizers & _WHITESPACE_DROPPING:
        text = " ".join(text.split())
    return text


def _tokens_around(tokenizer: Any, text: str, position: int, add_special_tokens: bool) -> str:
    """The tokens whose text spans ``position`` of ``text``, with two neighbours on each side."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers give no offsets
        return "(no offsets: slow tokenizer)"
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    index = next((i for i, (start, end) in enumerate(offsets) if start <= position < max(end, start + 1)), len(ids) - 1)
    window = range(max(0, index - 2), min(len(ids), index + 3))
    pieces = tokenizer.convert_ids_to_tokens([ids[i] for i in window])
    return ", ".join(f"{piece!r} (id {ids[i]})" for i, piece in zip(window, pieces, strict=True))


def assert_tokenizer_round_trip(model: Any, tokenizer: Any, *, texts: Sequence[str] = ROUND_TRIP_CORPUS) -> None:
    """``decode(encode(text))`` gives the text back: plain, and with special tokens added then skipped.

    The built-in corpus covers prose, indented code, numbers, accents and scripts,
    emoji, leading and repeated spaces and newlines. Normalizations the tokenizer
    declares (lowercasing, accent stripping, NFKC) and whitespace a WordPiece
    pre-tokenizer drops by design are applied to the expected text.
    """
    __tracebackhide__ = True
    normalizers, pre_tokenizers = _backend_parts(tokenizer)
    for text in texts:
        expected = _expected_text(text, normalizers, pre_tokenizers)
        for with_specials in (False, True):
            ids = tokenizer(text, add_special_tokens=with_specials)["input_ids"]
            decoded = tokenizer.decode(ids, skip_special_tokens=with_specials, clean_up_tokenization_spaces=False)
            if pre_tokenizers & _WHITESPACE_DROPPING:
                decoded = " ".join(decoded.split())
            if decoded != expected:
                raise _round_trip_failure(model, tokenizer, text, expected, decoded, with_specials)


def _round_trip_failure(
    model: Any, tokenizer: Any, text: str, expected: str, decoded: str, with_specials: bool
) -> AssertionError:
    first = first_difference(expected, decoded) or 0
    unk = getattr(tokenizer, "unk_token", None)
    cause = (
        f"characters outside the vocabulary became {unk!r} (a lost byte fallback?)"
        if unk and unk in decoded and unk not in expected
        else "the decoder does not invert the encoder (prefix space, byte decoder or normalizer changed?)"
    )
    how = (
        "encode with special tokens, decode skipping them" if with_specials else "encode and decode, no special tokens"
    )
    return failure(
        f"tokenizer round trip changes the text at character {first}",
        model,
        [
            ("text", repr(text)),
            ("how", how),
            ("expected", repr(expected[max(0, first - 15) : first + 15])),
            ("decoded", repr(decoded[max(0, first - 15) : first + 15])),
            ("tokens there", _tokens_around(tokenizer, text, min(first, len(text) - 1), with_specials)),
            ("likely cause", cause),
        ],
        figure=("char", first),
    )


BOS_PROBE = "\u2063BOS-PROBE\u2063"


def template_writes_bos(tokenizer: Any, messages: Sequence[dict[str, str]]) -> bool:
    """Whether the chat template writes the tokenizer's BOS (probed by renaming it, not by reading the source)."""
    from .chat import render

    return BOS_PROBE in render(tokenizer, messages, True, bos_token=BOS_PROBE)


def _find(sequence: list[int], part: list[int]) -> int | None:
    return next((i for i in range(len(sequence) - len(part) + 1) if sequence[i : i + len(part)] == part), None)


def assert_prompt_special_tokens(
    model: Any, tokenizer: Any, *, texts: Sequence[str] = ROUND_TRIP_CORPUS[:2], chat_messages: Any = None
) -> None:
    """A plain ``tokenizer(text)`` adds only a leading BOS, and only where the model expects one.

    Never an eos or separator after the prompt (generation would start after an
    end-of-text); the text's own ids unchanged; with a chat template, a BOS exactly
    when the template writes one (``apply_chat_template`` tokenizes without
    special tokens, so the two paths must agree).
    """
    __tracebackhide__ = True
    bos = tokenizer.bos_token_id
    adds_bos = False
    for text in texts:
        plain = tokenizer(text)["input_ids"]
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = _find(plain, bare)
        if start is None:
            raise failure(
                "adding special tokens changes the text's own ids",
                model,
                [("text", repr(text)), ("tokenizer(text)", plain[:12]), ("add_special_tokens=False", bare[:12])],
            )
        prefix, suffix = plain[:start], plain[start + len(bare) :]
        if suffix:
            names = tokenizer.convert_ids_to_tokens(suffix)
            raise failure(
                "a plain encode appends tokens after the prompt: generation would start after them",
                model,
                [
                    ("text", repr(text)),
                    ("appended", ", ".join(f"{n!r} (id {i})" for n, i in zip(names, suffix, strict=True))),
                    ("likely cause", "add_eos_token=True, or a post-processor template ending in eos/sep"),
                ],
                figure=("appended", len(suffix)),
            )
        if prefix and prefix != [bos]:
            raise failure(
                "a plain encode prepends something other than one BOS",
                model,
                [("text", repr(text)), ("prepended", tokenizer.convert_ids_to_tokens(prefix)), ("bos", bos)],
            )
        adds_bos = bool(prefix)
    _check_bos_agrees_with_template(model, tokenizer, adds_bos, chat_messages)


def _check_bos_agrees_with_template(model: Any, tokenizer: Any, adds_bos: bool, chat_messages: Any) -> None:
    __tracebackhide__ = True
    if not getattr(tokenizer, "chat_template", None) or tokenizer.bos_token is None:
        return
    from .chat import MESSAGES

    writes_bos = template_writes_bos(tokenizer, [m for m in (chat_messages or MESSAGES) if m["role"] != "system"])
    if writes_bos == adds_bos:
        return
    said = (
        "a plain encode adds BOS, but the chat template does not write it: chat prompts reach the model without BOS"
        if adds_bos
        else "the chat template writes BOS, but a plain encode adds none: plain prompts reach the model without BOS"
    )
    raise failure(
        f"BOS disagrees between plain prompts and chat prompts: {said}",
        model,
        [
            ("bos", f"{tokenizer.bos_token!r} (id {tokenizer.bos_token_id})"),
            ("plain encode adds BOS", adds_bos),
            ("template writes BOS", writes_bos),
        ],
    )


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
        first = first_difference(streamed, whole) or 0
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
