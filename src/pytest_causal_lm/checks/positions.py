"""Far positions: what the checkpoint promises up to ``max_position_embeddings``, checked without a long input.

Positions past the first few dozen are rarely looked at: the long-context invariant needs a declared boundary.
For a position encoding that depends only on distance (RoPE without length-dependent scaling, ALiBi), the same
short window of tokens placed at far offsets (``position_ids`` shifted) must score as it does at the start; a
rotary table built for a shorter context, positions clamped or wrapped, or angles computed in half precision
break that. Learned absolute position embeddings are not shift-invariant by design: their far rows must exist
and give finite scores.
"""

from __future__ import annotations

from typing import Any

import pytest

from ._common import DEFAULT_TEXTS, CheckResult, failure, text_of, token
from .context import _PER_CALL_ROPE, _rope_parameter_sets

__all__ = ["MAX_SHIFT_KL", "assert_far_positions_consistent", "position_encoding"]

# Per-position KL divergence (nats) a shifted window may show. Measured at the far end of the context, per
# position at most: SmolLM2-135M 3e-7 in float32, 0.03 in bfloat16, 3e-4 in float16; a rotary table clamped
# at 64 positions gives 0.9-2.8 on tiny checkpoints and 4.0 on SmolLM2.
MAX_SHIFT_KL = 0.25
WINDOW = 16
_ABSOLUTE_TABLES = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def position_encoding(model: Any) -> tuple[str | None, str]:
    """``("relative", what)``, ``("absolute", what)`` or ``(None, why not)``, from the config (and, for learned
    tables, the embedding module the config sizes)."""
    text = model.config.get_text_config()
    table = _absolute_table(model)
    if table is not None:
        return "absolute", f"learned position embeddings ({table[0]})"
    kinds = {r.get("rope_type", r.get("type", "default")) for r in _rope_parameter_sets(text)}
    per_call = sorted(kinds & set(_PER_CALL_ROPE))
    if per_call:
        return None, f"RoPE {per_call[0]} scales its frequencies with each call's length, so a shift is not neutral"
    if _alibi(model.config, text):
        return "relative", "ALiBi"
    if kinds or getattr(text, "rope_theta", None) is not None:
        return "relative", f"RoPE ({', '.join(sorted(kinds)) or 'default'})"
    return None, "the config declares neither RoPE, ALiBi nor learned position embeddings"


def _alibi(config: Any, text: Any) -> bool:
    attention = getattr(text, "attn_config", None)
    in_attention = attention.get("alibi") if isinstance(attention, dict) else getattr(attention, "alibi", False)
    return bool(getattr(text, "alibi", False) or in_attention or config.model_type == "bloom")


def _absolute_table(model: Any) -> tuple[str, Any] | None:
    import torch

    for name, module in model.named_modules():
        if name.split(".")[-1] in _ABSOLUTE_TABLES and isinstance(module, torch.nn.Embedding):
            return name, module
    return None


def _offsets(model: Any, length: int) -> list[int]:
    """A quarter, a half and the end of the declared context; aligned to attention chunks, which do depend on
    absolute positions (a window must not straddle a chunk edge at one offset and not at the other)."""
    text = model.config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:  # XLNet's -1: "no sequence length limit"
        pytest.skip("far positions: the config declares no max_position_embeddings, so no far position is promised")
    if limit < 4 * length:
        pytest.skip(f"far positions: max_position_embeddings {limit} is too short to shift a window in")
    chunk = getattr(text, "attention_chunk_size", None)
    align = chunk if isinstance(chunk, int) and chunk > length else 1
    picks = {limit // 4, limit // 2, limit - length}
    return sorted({max(align, offset // align * align) for offset in picks})


def assert_far_positions_consistent(model: Any, tokenizer: Any, *, text: str = DEFAULT_TEXTS[2]) -> CheckResult:
    """A window of ``text`` scores alike at the start and at far offsets up to ``max_position_embeddings``
    (per-position KL <= MAX_SHIFT_KL) for relative encodings; for learned absolute ones the far rows exist and
    give finite scores. Skips where the config declares no position encoding to judge."""
    __tracebackhide__ = True
    kind, what = position_encoding(model)
    if kind is None:
        pytest.skip(f"far positions: {what}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :WINDOW].to(model.device)
    offsets = _offsets(model, ids.shape[1])
    result = CheckResult("far positions")
    start = _scores(model, ids, 0)
    for offset in offsets:
        far = _scores(model, ids, offset)
        if kind == "absolute":
            _check_finite(model, tokenizer, ids, far, offset)
            continue
        p, q = start.log_softmax(-1), far.log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
        result.figure = ("KL max", max(float(kl.max()), result.figure[1] if result.figure else 0.0))
        if float(kl.max()) > MAX_SHIFT_KL:
            _shift_failure(model, tokenizer, ids, start, far, kl, offset, what)
    result.note(f"{what}: a {ids.shape[1]}-token window at offsets {offsets} of {_limit(model)} positions")
    return result


def _limit(model: Any) -> int:
    return model.config.get_text_config().max_position_embeddings


def _scores(model: Any, ids: Any, offset: int) -> Any:
    import torch

    positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)[None]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()


def _shift_failure(model: Any, tokenizer: Any, ids: Any, start: Any, far: Any, kl: Any, offset: int, what: str) -> None:
    __tracebackhide__ = True
    position = int(kl.argmax())
    raise failure(
        f"far positions: the same tokens at offset {offset} score unlike at the start ({what} depends on distance "
        "only)",
        model,
        [
            ("window", text_of(tokenizer, ids[0])),
            ("worst position", f"{position} of the window, after {text_of(tokenizer, ids[0, : position + 1])}"),
            ("KL", f"{float(kl[position]):.3g} nats > {MAX_SHIFT_KL} (mean over the window {float(kl.mean()):.3g})"),
            ("top-1 at start", token(tokenizer, int(start[position].argmax()))),
            (f"top-1 at {offset}", token(tokenizer, int(far[position].argmax()))),
            (
                "likely cause",
                "a rotary table built for a shorter context (positions clamped or wrapped), or rotary "
                "angles computed in the run dtype instead of float32",
            ),
        ],
        figure=("KL max", float(kl.max())),
    )


def _check_finite(model: Any, tokenizer: Any, ids: Any, far: Any, offset: int) -> None:
    __tracebackhide__ = True
    import torch

    bad = ~torch.isfinite(far).all(-1)
    if not bool(bad.any()):
        return
    position = int(bad.nonzero()[0])
    name, table = _absolute_table(model)
    rows = table.weight[offset : offset + ids.shape[1]]
    raise failure(
        f"far positions: non-finite scores at position {offset + position} (learned position embeddings)",
        model,
        [
            ("window", text_of(tokenizer, ids[0])),
            (
                "table",
                f"{name}: {table.weight.shape[0]} rows, {int((~torch.isfinite(rows)).any(-1).sum())} "
                f"non-finite among rows {offset}..{offset + ids.shape[1] - 1}",
            ),
        ],
        figure=("position", float(offset + position)),
    )
