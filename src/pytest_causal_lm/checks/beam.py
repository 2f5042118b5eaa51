"""Beam search: the decoding path of translation and constrained generation, which reorders the cache between
steps as beams overtake each other.

Two agreements on prompts where beams really reorder: beam search with the cache returns the sequences and
sequence scores it returns without one; each returned sequence's score is the sum of its tokens'
log-probabilities under one plain forward, divided by its length to the power ``length_penalty``. The count of
steps at which a returned beam moved to another cache row goes into the verdict: a reorder that never happens
proves nothing about ``reorder_cache``. ``num_beams=1`` is not compared here: generate sends it down its greedy
path, which greedy-loop parity already holds against the hand-written loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    default_positions_differ,
    encode,
    error_failure,
    failure,
    first_difference,
    resolve_tolerance,
    text_of,
    token,
    transformers_refusal,
    until_eos,
)
from ._generation import _clean_generation_config

__all__ = ["assert_beam_search_consistent"]

BEAMS = 4
LENGTH_PENALTY = 1.0


@dataclass
class _Beams:
    """What one beam search returned: each returned sequence's new tokens, its score, and its cache row per step."""

    rows: list[list[int]]
    scores: list[float]
    beam_indices: Any  # (returned, steps), -1 past a sequence's end

    def reorders(self) -> int:
        """Steps at which some returned sequence came from another cache row than at the step before."""
        indices = self.beam_indices[:, : max(len(r) for r in self.rows)]
        moved = (indices[:, 1:] != indices[:, :-1]) & (indices[:, 1:] >= 0)
        return int(moved.any(0).sum())


def _beam_search(model: Any, tokenizer: Any, ids: Any, *, use_cache: bool, max_new_tokens: int) -> _Beams:
    import torch
    from transformers import GenerationConfig

    with _clean_generation_config(model, tokenizer) as clean, torch.no_grad():
        config = GenerationConfig(
            do_sample=False,
            num_beams=BEAMS,
            num_return_sequences=BEAMS,
            length_penalty=LENGTH_PENALTY,
            early_stopping=True,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            eos_token_id=clean.eos_token_id,
            pad_token_id=clean.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    stop = set(clean.eos_token_id or [])
    rows = [until_eos(row[ids.shape[1] :].tolist(), stop) for row in out.sequences]
    return _Beams(rows, [float(s) for s in out.sequences_scores], out.beam_indices.cpu())


def _searched(model: Any, tokenizer: Any, ids: Any, use_cache: bool, max_new_tokens: int) -> _Beams:
    """Beam search, skipping where transformers refuses it for this model (its words), failing on any other error."""
    __tracebackhide__ = True
    try:
        return _beam_search(model, tokenizer, ids, use_cache=use_cache, max_new_tokens=max_new_tokens)
    except Exception as exc:
        words = transformers_refusal(exc)
        if words is None:
            raise error_failure(exc, model, f"beam search ({'with' if use_cache else 'without'} the cache)") from None
    pytest.skip(f"transformers refuses beam search for {type(model).__name__}: {words}")
    return None  # type: ignore[return-value]


def assert_beam_search_consistent(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = DEFAULT_TEXTS[:2],
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Beams with the cache give the sequences and scores they give without it; each sequence's score is its
    tokens' summed log-probabilities under a plain forward over its length."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("beam search", tolerance=tolerance)
    reorders = 0
    for text in texts:
        ids = encode(tokenizer, text, model.device)
        cached = _searched(model, tokenizer, ids, True, max_new_tokens)
        uncached = _searched(model, tokenizer, ids, False, max_new_tokens)
        _check_scores_are_forward_sums(model, tokenizer, ids, cached, result)
        _check_same_beams(model, tokenizer, ids, cached, uncached, result)
        reorders += cached.reorders()
    result.figure = ("reorders", reorders)
    result.note(f"{BEAMS} beams, {len(texts)} prompts: a returned beam changed cache rows at {reorders} step(s)")
    return result


def _sequence_logprobs(model: Any, ids: Any, rows: list[list[int]]) -> list[Any]:
    """Per returned row, each new token's log-probability under a plain forward over the prompt and the row: one
    batch, right-padded (padding after a row's tokens changes none of their scores, by causality)."""
    import torch

    width = max(len(row) for row in rows)
    new = torch.zeros((len(rows), width), dtype=ids.dtype)
    mask = torch.zeros((len(rows), ids.shape[1] + width), dtype=torch.long)
    for index, row in enumerate(rows):
        new[index, : len(row)] = torch.tensor(row, dtype=ids.dtype)
        mask[index, : ids.shape[1] + len(row)] = 1
    full = torch.cat([ids.expand(len(rows), -1), new.to(ids.device)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask.to(ids.device)).logits[:, ids.shape[1] - 1 : -1]
    logprobs = logits.float().log_softmax(-1).gather(-1, full[:, ids.shape[1] :, None].to(logits.device))[..., 0]
    return [logprobs[index, : len(row)].cpu() for index, row in enumerate(rows)]


def _check_scores_are_forward_sums(model: Any, tokenizer: Any, ids: Any, beams: _Beams, result: CheckResult) -> None:
    """``sequences_scores`` = summed token log-probabilities / length ** length_penalty; a token's log-probability
    may differ by twice the score tolerance (both its score and the normaliser), so the bound grows with length."""
    __tracebackhide__ = True
    for rank, (row, logprobs) in enumerate(zip(beams.rows, _sequence_logprobs(model, ids, beams.rows), strict=True)):
        expected = float(logprobs.sum()) / len(row) ** LENGTH_PENALTY
        difference = abs(beams.scores[rank] - expected)
        result.greatest_difference = max(result.greatest_difference, difference)
        bound = 2 * result.tolerance.atol + result.tolerance.rtol * abs(expected)
        if difference > bound:
            raise failure(
                f"beam search: the score of returned sequence {rank} is not its tokens' log-probabilities under a "
                "plain forward",
                model,
                [
                    ("prompt", text_of(tokenizer, ids[0])),
                    ("sequence", text_of(tokenizer, row)),
                    ("generate's score", f"{beams.scores[rank]:.6g}"),
                    (
                        "forward",
                        f"{expected:.6g} (sum {float(logprobs.sum()):.6g} over {len(row)} tokens ** {LENGTH_PENALTY})",
                    ),
                    ("difference", f"{difference:.3g} > {bound:.3g} (2 x atol + rtol x |score|: {result.tolerance})"),
                    ("weakest token", _weakest(tokenizer, row, logprobs)),
                    *_likely_cause(model, ids, result.tolerance),
                ],
                figure=("Δ score", difference),
            )


def _likely_cause(model: Any, ids: Any, tolerance: Tolerance) -> list[tuple[str, object]]:
    cause = default_positions_differ(model, ids, tolerance)
    return [("likely cause", cause)] if cause else []


def _weakest(tokenizer: Any, row: list[int], logprobs: Any) -> str:
    step = int(logprobs.argmin())
    return f"step {step}, {token(tokenizer, row[step])}: log-probability {float(logprobs[step]):.4g} under the forward"


def _check_same_beams(
    model: Any, tokenizer: Any, ids: Any, cached: _Beams, uncached: _Beams, result: CheckResult
) -> None:
    """The cache changes neither the returned sequences nor their scores. Where the sequences part, both sides'
    sequences are scored by a plain forward: a part where their scores tie within the tolerance is a near-tie
    (noted), any other is a failure."""
    __tracebackhide__ = True
    tolerance = result.tolerance
    for rank, (with_cache, without) in enumerate(zip(cached.rows, uncached.rows, strict=True)):
        step = first_difference(with_cache, without)
        if step is None:
            difference = abs(cached.scores[rank] - uncached.scores[rank])
            result.greatest_difference = max(result.greatest_difference, difference)
            if difference <= 2 * tolerance.atol + tolerance.rtol * abs(uncached.scores[rank]):
                continue
        both = _sequence_logprobs(model, ids, [with_cache, without])
        scores = [float(lp.sum()) / len(r) ** LENGTH_PENALTY for lp, r in zip(both, (with_cache, without), strict=True)]
        if step is not None and abs(scores[0] - scores[1]) <= 2 * tolerance.atol * max(len(with_cache), len(without)):
            result.near_tie = True
            result.note(f"beam {rank} parts at a near-tie with and without the cache (step {step})")
            continue
        raise failure(
            f"beam search with the cache differs from beam search without it: returned sequence {rank}"
            + (f" parts at step {step}" if step is not None else " scores differently"),
            model,
            [
                ("prompt", text_of(tokenizer, ids[0])),
                ("with the cache", f"{text_of(tokenizer, with_cache)}, score {cached.scores[rank]:.6g}"),
                ("without", f"{text_of(tokenizer, without)}, score {uncached.scores[rank]:.6g}"),
                ("plain forward", f"scores {scores[0]:.6g} (with) and {scores[1]:.6g} (without)"),
                *(
                    [("tokens there", f"{token(tokenizer, with_cache[step])} vs {token(tokenizer, without[step])}")]
                    if step is not None and step < min(len(with_cache), len(without))
                    else []
                ),
                ("likely cause", "the cache is not reordered with the beams (reorder_cache / _reorder_cache)"),
            ],
            figure=("step", step if step is not None else -1),
        )
