"""dtype parity: the checkpoint in half precision says what it says in float32, on the same weights.

A missing float32 upcast in RMSNorm, softmax or rotary embeddings, or a float16
overflow in a residual stream, leaves float32 correct and breaks the dtype the
checkpoint ships in. The run dtype is compared with float32 (or, for a float32
run of a half-precision checkpoint, with the stored dtype): finite scores, no
constant score rows, KL divergence and top-1 agreement over positions, and
greedy agreement up to the first divergence, which must be a near-tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from ..tolerances import Tolerance, tolerance_for
from ._common import (
    CheckResult,
    encode,
    eos_ids,
    failure,
    first_difference,
    forward_logits,
    kl_per_position,
    resolve_tolerance,
    text_of,
    token,
)
from ._generation import greedy_loop
from ._localise import Replay, Side, localisation_rows

__all__ = ["DTYPE_PARITY_TEXTS", "assert_dtype_parity"]

DTYPE_PARITY_TEXTS: tuple[str, ...] = (
    "Hi dog how are you?",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
)
MAX_KL_MEAN = 0.05  # nats; SmolLM2 bfloat16 vs float32 measures 0.002
# The long sequence: attention sums over hundreds of keys, and positions past 256 are where bfloat16 stops
# holding integers exactly (rotary angles computed in the run dtype go wrong there, and only there).
LONG_TOKENS = 384


def _half(dtype: Any) -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16)


def _other_dtype(model: Any, stored: str | None) -> Any:
    """float32 for a half-precision run; the stored dtype for a float32 run of a half-precision checkpoint.

    ``stored`` is what the checkpoint's files hold; without it, what the loaded config declares.
    """
    import torch

    if _half(model.dtype):
        return torch.float32
    declared = stored or getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    as_torch = getattr(torch, str(declared).removeprefix("torch."), None) if declared else None
    if _half(as_torch):
        return as_torch
    if stored is None:
        what = "a checkpoint whose files name no dtype (its config, as loaded, says float32)"
    elif stored == "float32":
        what = "a checkpoint stored in float32"
    else:
        what = f"a checkpoint stored as {stored}, not a half-precision float type (dequantised to float32 on load)"
    pytest.skip(f"a float32 run of {what}: no other dtype to compare (run with --causal-lm-dtype=bfloat16 or float16)")
    return None


def _run(model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int) -> list[tuple[Any, Any]]:
    """Per text: (scores at every position, the uncached greedy loop with its step scores)."""
    stop = eos_ids(model, tokenizer)
    runs = []
    for text in texts:
        ids = encode(tokenizer, text, model.device)
        loop = greedy_loop(model, ids, max_new_tokens=max_new_tokens, stop_ids=stop)
        runs.append((forward_logits(model, ids)[0].cpu(), loop))
    return runs


def assert_dtype_parity(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = DTYPE_PARITY_TEXTS,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
    stored_dtype: str | None = None,
) -> CheckResult:
    """The run dtype agrees with float32 on the same weights (see the module docstring).

    ``stored_dtype``: what the checkpoint's files hold (``CausalLM.stored_dtype``); a float32 run of a
    half-precision checkpoint compares float32 with it.
    """
    __tracebackhide__ = True
    import torch

    from ..precision import room_for, weights_in

    other = _other_dtype(model, stored_dtype)
    fits, cost = room_for(model, other)
    if not fits:
        pytest.skip(f"dtype parity needs the weights in {str(other).removeprefix('torch.')} too: {cost}")
    tolerance = resolve_tolerance(model, tolerance)
    run = _run(model, tokenizer, texts, max_new_tokens)
    with weights_in(model, other):
        reference = _run(model, tokenizer, texts, max_new_tokens)
    half, exact = (run, reference) if _half(model.dtype) else (reference, run)
    label = str(model.dtype if _half(model.dtype) else other).removeprefix("torch.")
    clear = tolerance_for(label).atol  # top choices closer than this in float32 are not a clear order
    result = CheckResult("dtype parity", tolerance=tolerance)
    kls = []
    for text, (half_scores, half_run), (exact_scores, exact_run) in zip(texts, half, exact, strict=True):
        ids = encode(tokenizer, text, "cpu")[0]
        _check_rows(model, tokenizer, ids, half_scores, exact_scores, label)
        _check_top1(model, tokenizer, ids, half_scores, exact_scores, label, clear)
        _check_greedy(model, tokenizer, ids, half_run, exact_run, label)
        kls.append(kl_per_position(exact_scores, half_scores))
        result.observe(exact_scores, half_scores)
    long_ids, long_half, long_exact = _long_sequence(model, tokenizer, other)
    if long_ids is not None:
        _check_rows(model, tokenizer, long_ids, long_half, long_exact, label)
        _check_top1(model, tokenizer, long_ids, long_half, long_exact, label, clear)
        kls.append(kl_per_position(long_exact, long_half))
        result.observe(long_exact, long_half)
        result.note(f"and a {len(long_ids)}-token sequence in one forward")
    kl = torch.cat(kls)
    result.figure = ("KL mean", float(kl.mean()))
    if float(kl.mean()) > MAX_KL_MEAN:
        raise failure(
            f"{label} scores drift from float32: KL mean {float(kl.mean()):.3g} > {MAX_KL_MEAN}",
            model,
            [("KL max", f"{float(kl.max()):.3g}"), ("texts", [t[:30] for t in texts])],
            figure=result.figure,
        )
    return result


def _long_sequence(model: Any, tokenizer: Any, other: Any) -> tuple[Any, Any, Any]:
    """``(ids, half scores, float32 scores)`` of ``LONG_TOKENS`` tokens of prose (fewer where the config's
    positions end sooner), or Nones where not even 64 fit."""
    from ..precision import weights_in
    from ._common import DEFAULT_TEXTS

    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or LONG_TOKENS
    length = min(LONG_TOKENS, int(limit))
    if length < 64:
        return None, None, None
    text = " ".join([*DEFAULT_TEXTS, *DTYPE_PARITY_TEXTS])
    ids = encode(tokenizer, " ".join([text] * (1 + 4 * length // max(len(text), 1))), model.device)[:, :length]
    run = forward_logits(model, ids)[0].cpu()
    with weights_in(model, other):
        reference = forward_logits(model, ids)[0].cpu()
    half, exact = (run, reference) if _half(model.dtype) else (reference, run)
    return ids[0].cpu(), half, exact


def _check_rows(model: Any, tokenizer: Any, ids: Any, half: Any, exact: Any, label: str) -> None:
    """Every half-precision score is finite, and no row is constant where float32's is not."""
    __tracebackhide__ = True
    import torch

    bad = ~torch.isfinite(half)
    constant = (half.float().std(-1) == 0) & (exact.float().std(-1) > 0)
    rows = bad.any(-1) | constant
    if not bool(rows.any()):
        return
    position = int(rows.nonzero()[0])
    what = "non-finite scores" if bool(bad[position].any()) else "a constant score row (every token scored alike)"
    raise failure(
        f"{label} gives {what} at position {position}, where float32 is finite and varied",
        model,
        [
            ("prefix", text_of(tokenizer, ids[: position + 1])),
            ("token there", token(tokenizer, int(ids[position]))),
            ("positions affected", sorted(int(p) for p in rows.nonzero().flatten())[:20]),
            *first_departing_module(model, ids[: position + 1], label),
            (
                "likely cause",
                "an overflow in float16 (a large residual channel) or a norm/softmax computed without the float32 upcast",
            ),
        ],
        figure=("position", position),
    )


def _check_top1(model: Any, tokenizer: Any, ids: Any, half: Any, exact: Any, label: str, clear: float) -> None:
    """The half-precision top-1 is within float32's top 5 wherever float32's top 5 stand clear of the rest."""
    __tracebackhide__ = True
    top6 = exact.float().topk(6, -1)
    decisive = (top6.values[:, 0] - top6.values[:, 5]) > clear
    choice = half.float().argmax(-1)
    wrong = decisive & ~(top6.indices[:, :5] == choice[:, None]).any(-1)
    if not bool(wrong.any()):
        return
    position = int(wrong.nonzero()[0])
    expected = int(exact[position].argmax())
    raise failure(
        f"{label} picks another token than float32 at position {position}, outside float32's top 5",
        model,
        [
            ("prefix", text_of(tokenizer, ids[: position + 1])),
            ("float32 top-1", f"{token(tokenizer, expected)} score {float(exact[position, expected]):.4g}"),
            (f"{label} top-1", token(tokenizer, int(choice[position]))),
            ("positions affected", sorted(int(p) for p in wrong.nonzero().flatten())[:20]),
        ],
        figure=("position", position),
    )


def _check_greedy(model: Any, tokenizer: Any, ids: Any, half: Any, exact: Any, label: str) -> None:
    """Greedy continuations agree up to the first divergence, where each side's token is in the other's top 5
    (vLLM's check_logprobs_close); after it the prefixes differ and nothing more is compared."""
    __tracebackhide__ = True
    shared = min(len(half.tokens), len(exact.tokens))  # one side's earlier eos is not a divergence
    step = first_difference(half.tokens[:shared], exact.tokens[:shared])
    if step is None:
        return
    half_top5 = half.step_scores[step].topk(5).indices.tolist()
    exact_top5 = exact.step_scores[step].topk(5).indices.tolist()
    if exact.tokens[step] in half_top5 and half.tokens[step] in exact_top5:
        return
    raise failure(
        f"greedy continuation in {label} leaves float32's top 5 at step {step}",
        model,
        [
            ("prompt", text_of(tokenizer, ids)),
            ("shared prefix", text_of(tokenizer, [*ids.tolist(), *exact.tokens[:step]])),
            ("float32", f"{token(tokenizer, exact.tokens[step])}, then {text_of(tokenizer, exact.tokens[step + 1 :])}"),
            (label, f"{token(tokenizer, half.tokens[step])}, then {text_of(tokenizer, half.tokens[step + 1 :])}"),
        ],
        figure=("step", step),
    )


def _departs_in(half: Any) -> Any:
    """A module departs in ``half`` where its output is not finite, strays by more than half its float32 scale,
    or holds float32 values beyond ``half``'s range: a rounding error of half precision does neither."""
    import torch

    limit = torch.finfo(half).max

    def departs(exact: Any, rounded: Any, share: float) -> bool:
        scale = float(exact.abs().max()) or 1.0
        return (
            not bool(torch.isfinite(rounded).all())
            or float((rounded - exact).abs().max()) > 0.5 * share * scale
            or scale > limit
        )

    return departs


def first_departing_module(model: Any, ids: Any, label: str) -> list[tuple[str, object]]:
    """Where the ``label`` forward of ``ids`` first departs from float32's on the same weights (the engine of
    every parity failure, with half precision's own notion of departing): where an overflow starts."""
    import torch

    from ..precision import weights_in

    half = getattr(torch, label)
    ids = ids.to(model.device)[None]

    def forward_in(dtype: Any) -> Any:
        def run() -> None:
            with weights_in(model, dtype):
                model(input_ids=ids)

        return run

    replay = Replay(Side("float32", forward_in(torch.float32)), Side(label, forward_in(half)), (ids.shape[1] - 1,))
    limit = torch.finfo(half).max
    range_row = (f"{label} range", f"values up to {limit:.3g}, squares of values up to {limit**0.5:.3g}")
    return [*localisation_rows(model, replay, _departs_in(half)), range_row]
