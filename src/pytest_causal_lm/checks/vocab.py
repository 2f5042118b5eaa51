"""Logits/vocab alignment and special-token agreement between tokenizer, config and generation config."""

from __future__ import annotations

from typing import Any

from ._common import DEFAULT_TEXTS, encode, failure, forward_logits
from .shapes import text_config

__all__ = ["assert_special_tokens_agree", "assert_vocab_alignment"]


def assert_vocab_alignment(model: Any, tokenizer: Any, *, text: str = DEFAULT_TEXTS[0]) -> None:
    """Logits width == lm_head rows == vocab_size <= input embedding rows, and every id the tokenizer can produce fits.

    A config.vocab_size larger than the tokenizer (padded for speed, as Qwen does) is fine.
    """
    __tracebackhide__ = True
    config = text_config(model)
    vocab_size = config.vocab_size
    input_ids = encode(tokenizer, text, model.device)
    logits = forward_logits(model, input_ids)
    widths = {"logits width": logits.shape[-1]}
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is not None and getattr(output_embeddings, "weight", None) is not None:
        widths["output embedding (lm_head) rows"] = output_embeddings.weight.shape[0]
    problems: list[tuple[str, object]] = [
        (name, f"{width} != config.vocab_size {vocab_size}") for name, width in widths.items() if width != vocab_size
    ]
    # extra input rows are harmless (Moshi keeps one for its start token); missing ones are not
    input_rows = model.get_input_embeddings().weight.shape[0]
    if input_rows < vocab_size:
        problems.append(("input embedding rows", f"{input_rows} < config.vocab_size {vocab_size}"))
    if len(tokenizer) > vocab_size:
        problems.append(("len(tokenizer)", f"{len(tokenizer)} > config.vocab_size {vocab_size}"))
    overruns = {
        token_id: getattr(added, "content", str(added))
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if token_id >= vocab_size
    }
    overruns.update(
        {
            token_id: name
            for name, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False)
            if token_id >= vocab_size
        }
    )
    if overruns:
        shown = ", ".join(f"{name!r} (id {token_id})" for token_id, name in sorted(overruns.items())[:8])
        problems.append(("ids >= vocab_size", f"{len(overruns)} special/added tokens: {shown}"))
    if not problems:
        try:
            tokenizer.decode(logits[0].argmax(-1).tolist())
        except Exception as exc:
            problems.append(("decoding argmax ids", f"{type(exc).__name__}: {exc}"))
    if problems:
        raise failure(
            "logits and vocabulary are not aligned (token ids would index past the score rows, or scores "
            "would name tokens that do not exist)",
            model,
            problems,
        )


def _as_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


def assert_special_tokens_agree(model: Any, tokenizer: Any) -> None:
    """eos/bos/pad ids agree between tokenizer, config and generation config.

    eos: the tokenizer's and config's eos must be among the ids generation stops at
    (generation_config may list several, as Llama 3 and Qwen do). bos and pad: every
    source that sets one must set the same id. Unset values are not compared.
    """
    __tracebackhide__ = True
    config = text_config(model)
    generation = getattr(model, "generation_config", None)
    sources = {
        "tokenizer": tokenizer,
        "config": config,
        "generation_config": generation,
    }
    problems: list[tuple[str, object]] = []

    def ids_of(kind: str) -> dict[str, set[int]]:
        found = {}
        for name, source in sources.items():
            value = getattr(source, f"{kind}_token_id", None) if source is not None else None
            if value is not None:
                found[name] = _as_set(value)
        return found

    def shown(found: dict[str, set[int]]) -> str:
        return ", ".join(
            f"{name} {sorted(ids) if len(ids) > 1 else next(iter(ids))}"
            + (f" ({tokenizer.decode(sorted(ids)[:1])!r})" if len(ids) == 1 else "")
            for name, ids in found.items()
        )

    eos = ids_of("eos")
    stop_ids = eos.get("generation_config") or eos.get("config")
    if stop_ids:
        missing = [name for name, ids in eos.items() if not ids & stop_ids]
        if missing:
            problems.append(("eos", f"{' and '.join(missing)} eos not among the ids generation stops at: {shown(eos)}"))
    for kind in ("bos", "pad"):
        found = ids_of(kind)
        if len({frozenset(ids) for ids in found.values()}) > 1:
            problems.append((kind, f"ids differ: {shown(found)}"))
    if problems:
        raise failure("special token ids disagree between tokenizer, config and generation_config", model, problems)
