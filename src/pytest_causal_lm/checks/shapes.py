"""Output shapes: logits, hidden states, KV cache, ``logits_to_keep``, finiteness."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    failure,
    mismatch_failure,
    resolve_tolerance,
    returned_cache,
    text_of,
    token,
)

__all__ = ["assert_finite_logits", "assert_logits_to_keep", "assert_output_shapes"]


def text_config(model: Any) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _padded_batch(tokenizer: Any, texts: Sequence[str], device: Any) -> dict[str, Any]:
    pad_restore = tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # shapes only; padding content is irrelevant here
    try:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    finally:
        tokenizer.pad_token = pad_restore
    return {k: v.to(device) for k, v in batch.items()}


def _decoder_of(model: Any) -> Any:
    try:
        return model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None


def _layers_run(config: Any) -> int:
    """The decoder blocks one forward runs: ``num_hidden_layers``, or for a looped (recurrent-depth) stack such
    as Dory's its input and output blocks plus the recurrent ones once per loop, each a hidden state and a cache
    layer of its own."""
    loops = getattr(config, "n_recurrent_loops", None)
    parts = [getattr(config, name, None) for name in ("n_input_layers", "n_recurrent_layers", "n_output_layers")]
    if not isinstance(loops, int) or not all(isinstance(part, int) for part in parts):
        return config.num_hidden_layers
    return parts[0] + parts[1] * loops + parts[2]


def _cache_shape_problems(cache: Any, seq: int, layers: int) -> list[tuple[str, object]]:
    """Every attention layer caches batch 1 and all ``seq`` positions (a sliding-window layer at most ``seq``).

    Heads and head size are left alone: multi-query, multi-latent and compressed
    caches lay them out their own way. Hybrid models cache only their attention layers.
    """
    problems: list[tuple[str, object]] = []
    if len(cache.layers) > layers:
        problems.append(
            ("past_key_values", f"{len(cache.layers)} layers, expected at most one per layer run = {layers}")
        )
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
            continue  # a linear-attention or recurrent layer: no positions to count
        sliding = getattr(layer, "is_sliding", False)
        for name, tensor in (("keys", layer.keys), ("values", layer.values)):
            shape = tuple(tensor.shape)
            held = shape[2] if len(shape) == 4 else None
            if shape[:1] != (1,) or held is None or held > seq or (held != seq and not sliding):
                expected = f"<= {seq}" if sliding else str(seq)
                problems.append(
                    (f"cache layer {index} {name}", f"shape {shape}, expected (1, heads, {expected}, head size)")
                )
    return problems


def assert_finite_logits(model: Any, tokenizer: Any, logits: Any, input_ids: Any) -> None:
    """Every score is finite (no NaN, no infinity); names the first bad position and token."""
    __tracebackhide__ = True
    import torch

    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return
    row, position, token_id = (int(i) for i in bad.nonzero()[0])
    value = float(logits[row, position, token_id])
    raise failure(
        f"non-finite logits: {int(bad.sum())} of {bad.numel()} scores are NaN or infinite",
        model,
        [
            ("first at", f"batch row {row}, position {position}, score of {token(tokenizer, token_id)} = {value}"),
            ("prefix", text_of(tokenizer, input_ids[row, : position + 1])),
            ("positions affected", sorted({int(p) for p in bad[row].any(-1).nonzero().flatten()})[:20]),
        ],
    )


def assert_output_shapes(model: Any, tokenizer: Any, *, texts: Sequence[str] = DEFAULT_TEXTS) -> None:
    """Logits are (batch, seq, vocab) for batch 1 and a padded batch; hidden states and cache match the config."""
    __tracebackhide__ = True
    import torch
    from transformers import DynamicCache

    config = text_config(model)
    device = model.device
    input_ids = encode(tokenizer, texts[0], device)
    seq = input_ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, use_cache=True)
    problems: list[tuple[str, object]] = []
    expected_logits = (1, seq, config.vocab_size)
    if tuple(out.logits.shape) != expected_logits:
        problems.append(("logits (batch 1)", f"shape {tuple(out.logits.shape)}, expected {expected_logits}"))
    hidden = out.hidden_states
    layers = _layers_run(config)
    # one state per decoder block plus the embeddings; LongCat-Flash counts two layers per block
    decoder_layers = getattr(_decoder_of(model), "layers", None)
    blocks = {layers, len(decoder_layers)} if decoder_layers else {layers}
    if hidden is None or len(hidden) - 1 not in blocks:
        problems.append(
            (
                "hidden_states",
                f"{None if hidden is None else len(hidden)} tensors, expected one per layer run + 1 = {layers + 1}",
            )
        )
    else:
        for index, state in enumerate(hidden):
            # the batch row's seq positions of hidden_size each; hyper-connection and AltUp models carry
            # several residual streams, laid out their own way (Gemma 3n puts them first)
            shape = tuple(state.shape)
            if seq not in shape or state.numel() % (seq * config.hidden_size) != 0:
                problems.append(
                    (
                        f"hidden_states[{index}]",
                        f"shape {shape}, expected (1, {seq}, {config.hidden_size}) or streams of it",
                    )
                )
                break
    cache = returned_cache(out)
    if isinstance(cache, DynamicCache):
        problems.extend(_cache_shape_problems(cache, seq, layers))
    batch = _padded_batch(tokenizer, texts, device)
    with torch.no_grad():
        batched = model(**batch).logits
    expected_batched = (*tuple(batch["input_ids"].shape), config.vocab_size)
    if tuple(batched.shape) != expected_batched:
        problems.append((f"logits (batch {len(texts)})", f"shape {tuple(batched.shape)}, expected {expected_batched}"))
    if problems:
        raise failure("output shapes do not match the config", model, [("input", repr(texts[0])), *problems])
    assert_finite_logits(model, tokenizer, out.logits, input_ids)
    assert_finite_logits(
        model, tokenizer, batched.masked_fill(batch["attention_mask"][..., None] == 0, 0.0), batch["input_ids"]
    )


def assert_logits_to_keep(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[1],
    counts: Sequence[int] = (1, 3),
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """``logits_to_keep=k`` returns only the last ``k`` rows, equal to the full forward's last ``k`` rows.

    ``generate`` asks for 1; assisted and prompt-lookup decoding ask for the proposed tokens plus one.
    """
    __tracebackhide__ = True
    import torch

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        pytest.skip(f"{type(model).__name__}.forward has no logits_to_keep argument")
    tolerance = resolve_tolerance(model, tolerance)
    input_ids = encode(tokenizer, text, model.device)
    result = CheckResult("logits_to_keep", tolerance=tolerance)
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
    for count in counts:
        with torch.no_grad():
            kept = model(input_ids=input_ids, logits_to_keep=count).logits
        expected_shape = (1, count, full.shape[-1])
        if tuple(kept.shape) != expected_shape:
            raise failure(
                f"logits_to_keep={count} did not return the last {count} position(s)",
                model,
                [("input", repr(text)), ("shape", f"{tuple(kept.shape)}, expected {expected_shape}")],
            )
        mismatch = check_scores(result, full[0, -count:], kept[0], tolerance)
        if mismatch:
            raise mismatch_failure(
                f"logits_to_keep={count} scores differ from the full forward's last {count} row(s)",
                model,
                tokenizer,
                [("input", repr(text)), ("rows", f"row 0 is position {input_ids.shape[1] - count}")],
                mismatch,
                tolerance,
                position_label="row",
            )
    return result
