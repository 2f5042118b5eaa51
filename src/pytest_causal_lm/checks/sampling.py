"""Sampling: the decoding path of chat UIs, and of every checkpoint whose ``generation_config.json`` sets
``do_sample``.

Four agreements, each deterministic (no statistical test, so nothing to flake): the same seed draws the same
tokens from the same scores; every step's raw scores (``output_logits``) equal one forward pass over the sampled
tokens, which leave greedy's path; every step's processed scores (``output_scores``) are the checkpoint's
sampling settings (temperature, top_k, top_p, min_p, repetition_penalty) applied by hand to those raw scores,
keeping the same tokens and giving them the same probabilities; ``top_k=1`` draws greedy's tokens. The
settings are the checkpoint's own where it samples by default (unset ones at transformers' defaults), else
representative ones; the verdict says which.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    encode,
    eos_ids,
    error_failure,
    failure,
    first_difference,
    pad_id,
    resolve_tolerance,
    text_of,
    token,
    transformers_refusal,
    until_eos,
)
from ._generation import ScoredGeneration, assert_generation_matches_forward, generate_scored
from .generation import REPEATING_TEXT

__all__ = ["SamplingSettings", "assert_sampling_consistent"]

RETURNED = 2  # num_return_sequences: generate expands the prompt's rows before the prefill
# Log-probability agreement of generate's processed scores with the hand-applied settings: both sides are the
# same float32 raw scores through the same arithmetic, whatever the model's dtype.
PROCESSED_ATOL = 1e-4
# A token this close to a top_p / min_p threshold may fall on either side of it (summation order).
THRESHOLD_SLACK = 1e-5

# Fields of a generation config that change the scores beyond the five sampling settings: named in a failure,
# since transformers applies them too.
_OTHER_PROCESSORS = (
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_length",
    "min_new_tokens",
    "sequence_bias",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "forced_bos_token_id",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "watermarking_config",
)
# What each field is at when a config leaves it unset (transformers 5's _get_default_generation_params).
_UNSET = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
_INERT = {"min_length": 0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


@dataclass(frozen=True)
class SamplingSettings:
    """The five settings that shape the sampled distribution, and where they came from."""

    temperature: float
    top_k: int | None
    top_p: float
    min_p: float | None
    repetition_penalty: float
    source: str = "representative settings (the checkpoint does not sample by default)"

    @classmethod
    def of(cls, generation_config: Any) -> SamplingSettings:
        """The checkpoint's settings where it samples by default, else representative ones that use all five."""
        if not getattr(generation_config, "do_sample", False):
            return cls(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
        values = {name: getattr(generation_config, name, None) for name in _UNSET}
        return cls(
            **{name: _UNSET[name] if value is None else value for name, value in values.items()},
            source="the checkpoint's generation_config (do_sample: true; unset fields at transformers' defaults)",
        )

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}

    def __str__(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in self.fields().items())


def processed_by_hand(raw: Any, history: Sequence[int], settings: SamplingSettings, slack: float = 0.0) -> Any:
    """``raw`` (vocab,) float32 scores through repetition penalty, temperature, top_k, top_p and min_p as their
    definitions say; removed tokens at -inf. ``slack`` > 0 widens top_p and min_p, < 0 narrows them."""
    import torch

    scores = raw.float().clone()
    if settings.repetition_penalty != 1.0 and len(history):
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=scores.device)
        picked = scores[seen]
        penalty = settings.repetition_penalty
        scores[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    scores = scores / settings.temperature
    if settings.top_k:
        kth = scores.topk(min(settings.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        removed = _mass_above(scores, ties_above=slack < 0) >= settings.top_p + slack
        scores = scores.masked_fill(removed, float("-inf"))
    if settings.min_p is not None:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < (settings.min_p - slack) * probs.max(), float("-inf"))
    return scores


def _mass_above(scores: Any, *, ties_above: bool) -> Any:
    """Per token, the probability of the tokens scored above it; a token tied with it counts as above only with
    ``ties_above`` (transformers' sort puts a tie on either side)."""
    import torch

    ordered, order = scores.sort(descending=True)
    probs = ordered.softmax(-1)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    through = probs.cumsum(-1)[counts.cumsum(0) - 1]  # the mass of each tie group and every group above it
    above = through[group] - probs if ties_above else (through - counts * probs[counts.cumsum(0) - 1])[group]
    return torch.empty_like(above).scatter(0, order, above)


@dataclass
class _Sampled:
    generation: ScoredGeneration  # each returned row's new tokens and raw scores
    processed: Any  # (rows, steps, vocab) float32: what generate sampled from


def _sampling_config(model: Any, tokenizer: Any, settings: SamplingSettings, max_new_tokens: int) -> Any:
    """The checkpoint's generation_config, as a user's ``generate(do_sample=True)`` gets it, with scores kept."""
    config = copy.deepcopy(model.generation_config)
    config.update(
        **settings.fields(),
        do_sample=True,
        num_beams=1,
        num_return_sequences=RETURNED,
        max_new_tokens=max_new_tokens,
        max_length=None,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    if config.pad_token_id is None:
        config.pad_token_id = pad_id(model, tokenizer)
    return config


def _sample(model: Any, tokenizer: Any, ids: Any, config: Any, seed: int) -> _Sampled:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    stop = eos_ids(model, tokenizer)
    rows = [until_eos(row, stop) for row in out.sequences[:, ids.shape[1] :].tolist()]
    stacked = [torch.stack([step.float().cpu() for step in steps], dim=1) for steps in (out.logits, out.scores)]
    return _Sampled(ScoredGeneration(rows, stacked[0]), stacked[1])


def _sampled(model: Any, tokenizer: Any, ids: Any, config: Any, seed: int) -> _Sampled:
    """Sampling, skipping where transformers refuses it for this model (its words), failing on any other error."""
    __tracebackhide__ = True
    try:
        return _sample(model, tokenizer, ids, config, seed)
    except Exception as exc:
        words = transformers_refusal(exc)
        if words is None:
            raise error_failure(exc, model, "sampling") from None
    pytest.skip(f"transformers refuses sampling for {type(model).__name__}: {words}")
    return None  # type: ignore[return-value]


def assert_sampling_consistent(
    model: Any,
    tokenizer: Any,
    *,
    texts: Sequence[str] = (DEFAULT_TEXTS[0], REPEATING_TEXT),
    seed: int = 0,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Seeded sampling is reproducible; its raw scores are a plain forward's over the sampled tokens; its
    processed scores are the sampling settings applied by hand; ``top_k=1`` draws greedy's tokens."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("sampling", tolerance=tolerance)
    settings = SamplingSettings.of(model.generation_config)
    config = _sampling_config(model, tokenizer, settings, max_new_tokens)
    for text in texts:
        ids = encode(tokenizer, text, model.device)
        first = _sampled(model, tokenizer, ids, config, seed)
        _check_reproducible(model, tokenizer, ids, first, _sampled(model, tokenizer, ids, config, seed), seed, result)
        assert_generation_matches_forward(
            model,
            tokenizer,
            ids.expand(RETURNED, -1),
            first.generation,
            title=f"sampling (seed {seed}, {settings})",
            result=result,
            details=[("prompt", text_of(tokenizer, ids[0]))],
            rerun=lambda ids=ids: _sample(model, tokenizer, ids, config, seed),
        )
        _check_processed(model, tokenizer, ids, first, settings, config)
    # One prompt is enough here: top_k=1 leaves nothing to draw, so a second prompt adds cost, not coverage.
    _check_top_k_one_is_greedy(
        model, tokenizer, encode(tokenizer, texts[0], model.device), max_new_tokens, seed, result
    )
    result.note(f"{settings.source}: {settings}; {RETURNED} samples of {len(texts)} prompts, seed {seed}")
    return result


def _check_reproducible(
    model: Any, tokenizer: Any, ids: Any, first: _Sampled, second: _Sampled, seed: int, result: CheckResult
) -> None:
    """The same seed gives the same scores and draws the same tokens from them."""
    __tracebackhide__ = True
    from ._common import check_scores, mismatch_failure

    for row, (once, again) in enumerate(zip(first.generation.rows, second.generation.rows, strict=True)):
        parted = first_difference(once, again)
        shared = min(len(once), len(again)) if parted is None else parted + 1
        compared = (first.generation.logits[row, :shared], second.generation.logits[row, :shared])
        mismatch = check_scores(result, *compared, result.tolerance)
        details = [("prompt", text_of(tokenizer, ids[0])), ("first run", text_of(tokenizer, once))]
        if mismatch:
            raise mismatch_failure(
                f"sampling is not reproducible: step {mismatch.first_position} of row {row} scores differently in a "
                f"second run with seed {seed}",
                model,
                tokenizer,
                [*details, ("likely cause", "randomness in the forward pass that torch.manual_seed does not seed")],
                mismatch,
                result.tolerance,
                position_label="step",
            )
        if parted is not None:
            raise failure(
                f"sampling is not reproducible: row {row} draws different tokens at step {parted} from the same "
                f"scores in a second run with seed {seed}",
                model,
                [
                    *details,
                    ("second run", text_of(tokenizer, again)),
                    ("likely cause", "a draw from a generator torch.manual_seed does not seed (a port's own sampler)"),
                ],
                figure=("step", parted),
            )


def _other_processors(config: Any) -> list[str]:
    """``name=value`` of each field of ``config`` beyond the sampling settings that changes the scores."""
    inert = {**_INERT, "guidance_scale": 1.0}
    return [
        f"{name}={value!r}"
        for name in _OTHER_PROCESSORS
        if (value := getattr(config, name, None)) not in (None, [], ()) and value != inert.get(name)
    ]


def _check_processed(
    model: Any, tokenizer: Any, ids: Any, sampled: _Sampled, settings: SamplingSettings, config: Any
) -> None:
    """At every step, generate keeps the tokens the settings keep (up to a token on a threshold) and gives
    them the probabilities the settings give."""
    __tracebackhide__ = True
    prompt = ids[0].tolist()
    for row, tokens in enumerate(sampled.generation.rows):
        for step in range(len(tokens)):
            raw, got = _forced_eos(config, step, sampled.generation.logits[row, step]), sampled.processed[row, step]
            history = prompt + tokens[:step]
            where = _Where(tokenizer, ids, tokens, row, step, settings, _other_processors(config))
            _check_kept(model, where, raw, got, history)
            _check_probabilities(model, where, raw, got, history)


def _forced_eos(config: Any, step: int, raw: Any) -> Any:
    """``raw`` as ``forced_eos_token_id`` leaves it (BART-style configs set it): at the last step allowed, every
    token but the forced eos is removed before the sampling settings apply."""
    forced = getattr(config, "forced_eos_token_id", None)
    if forced is None or step != config.max_new_tokens - 1:
        return raw
    kept = raw.new_full(raw.shape, float("-inf"))
    kept[list(forced) if isinstance(forced, (list, tuple)) else [forced]] = 0.0
    return kept


@dataclass(frozen=True)
class _Where:
    """One compared step, and what a failure there names."""

    tokenizer: Any
    ids: Any
    tokens: list[int]
    row: int
    step: int
    settings: SamplingSettings
    others: list[str]

    def details(self) -> list[tuple[str, object]]:
        return [
            ("prompt", text_of(self.tokenizer, self.ids[0])),
            ("sampled before", text_of(self.tokenizer, self.tokens[: self.step])),
            ("settings", f"{self.settings} ({self.settings.source})"),
            *([("generation_config also sets", ", ".join(self.others))] if self.others else []),
        ]

    def cause(self, generate_keeps_more: bool) -> tuple[str, str]:
        if self.others:
            return ("likely cause", f"transformers also applies {', '.join(self.others)} from generation_config")
        if generate_keeps_more:
            return ("likely cause", "a setting was not applied: a port's own logits-processor list or generate")
        return ("likely cause", "a logits processor beyond the settings: a port's own processor list or generate")


def _check_kept(model: Any, where: _Where, raw: Any, got: Any, history: list[int]) -> None:
    __tracebackhide__ = True
    settings = where.settings
    narrow = processed_by_hand(raw, history, settings, -THRESHOLD_SLACK).isfinite()
    wide = processed_by_hand(raw, history, settings, THRESHOLD_SLACK).isfinite()
    kept = got.isfinite()
    extra, missing = (kept & ~wide).nonzero().flatten(), (narrow & ~kept).nonzero().flatten()
    if not extra.numel() and not missing.numel():
        return
    more = not missing.numel()  # a removed token is reported first: it is the cause when both happen (a ban)
    token_id = int((extra if more else missing)[0])
    by_hand = processed_by_hand(raw, history, settings)
    probability = float(by_hand.softmax(-1)[token_id])
    raise failure(
        f"sampling: at step {where.step} of row {where.row} generate {'keeps' if more else 'removes'} "
        f"{token(where.tokenizer, token_id)}, which the sampling settings {'remove' if more else 'keep'}",
        model,
        [
            *where.details(),
            (
                "that token",
                f"raw score {float(raw[token_id]):.6g}, rank {int((raw > raw[token_id]).sum())} of "
                f"{raw.numel()}, probability {probability:.4g} under the settings",
            ),
            ("tokens kept", f"{int(kept.sum())} by generate, {int(by_hand.isfinite().sum())} by the settings"),
            where.cause(more),
        ],
        figure=("kept", float(kept.sum() - by_hand.isfinite().sum())),
    )


def _check_probabilities(model: Any, where: _Where, raw: Any, got: Any, history: list[int]) -> None:
    __tracebackhide__ = True
    by_hand = processed_by_hand(raw, history, where.settings)
    both = got.isfinite() & by_hand.isfinite()
    expected, actual = by_hand[both].log_softmax(-1), got[both].log_softmax(-1)
    difference = (actual - expected).abs()
    if not difference.numel() or float(difference.max()) <= PROCESSED_ATOL:
        return
    worst = int(difference.argmax())
    token_id = int(both.nonzero().flatten()[worst])
    raise failure(
        f"sampling: at step {where.step} of row {where.row} generate gives {token(where.tokenizer, token_id)} "
        "another probability than the sampling settings do",
        model,
        [
            *where.details(),
            (
                "log-probability",
                f"{float(actual[worst]):.6g} in generate, {float(expected[worst]):.6g} by the "
                f"settings (raw score {float(raw[token_id]):.6g})",
            ),
            (
                "difference",
                f"{float(difference[worst]):.3g} > {PROCESSED_ATOL} (both from the same float32 raw scores)",
            ),
            where.cause(False),
        ],
        figure=("Δ log-prob", float(difference[worst])),
    )


def _check_top_k_one_is_greedy(
    model: Any, tokenizer: Any, ids: Any, max_new_tokens: int, seed: int, result: CheckResult
) -> None:
    """``do_sample=True, top_k=1`` keeps only the top token, so it draws greedy's tokens (an exact tie aside)."""
    __tracebackhide__ = True
    import torch

    greedy = generate_scored(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    top_one = generate_scored(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, config_fields={"do_sample": True, "top_k": 1}
    )
    step = first_difference(greedy.rows[0], top_one.rows[0])
    if step is None or step >= min(len(greedy.rows[0]), len(top_one.rows[0])):
        return
    taken, drawn = greedy.rows[0][step], top_one.rows[0][step]
    scores = greedy.logits[0, step]
    if float(scores[taken]) == float(scores[drawn]):
        result.near_tie = True
        result.note(f"top_k=1 and greedy part at an exact tie (step {step})")
        return
    raise failure(
        f"sampling with top_k=1 draws another token than greedy at step {step}",
        model,
        [
            ("prompt", text_of(tokenizer, ids[0])),
            ("greedy", text_of(tokenizer, greedy.rows[0])),
            ("top_k=1", text_of(tokenizer, top_one.rows[0])),
            (
                "raw scores there",
                f"{token(tokenizer, taken)} {float(scores[taken]):.6g} (greedy's), "
                f"{token(tokenizer, drawn)} {float(scores[drawn]):.6g} (drawn)",
            ),
            ("likely cause", "top_k is not applied when sampling: a port's own logits-processor list or generate"),
        ],
        figure=("step", step),
    )
