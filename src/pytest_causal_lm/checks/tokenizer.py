"""Tokenizer invariants: text survives encode/decode, and a plain encode adds only what generation needs.

Many conversion bugs live in the tokenizer, not the weights: a prefix space
that shifts every id, a lost byte fallback, an eos appended to every prompt.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import Any

from ._common import failure

__all__ = ["ROUND_TRIP_CORPUS", "assert_prompt_special_tokens", "assert_tokenizer_round_trip", "template_writes_bos"]

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
_LOSSY_NORMALIZERS = {"Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "BertNormalizer"}
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
    first = next((i for i, (a, b) in enumerate(zip(expected, decoded, strict=False)) if a != b), None)
    first = min(len(expected), len(decoded)) if first is None else first
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
