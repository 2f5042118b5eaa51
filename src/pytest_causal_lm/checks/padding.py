"""Padding and batch invariance: a row's scores and greedy continuation do not depend on padding or other rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
    text_of,
    token,
)
from ._generation import compare_continuations, greedy_generate, greedy_loop_along
from ._localise import Replay, Side

__all__ = ["assert_batch_independent", "assert_padding_invariant"]


def assert_padding_invariant(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str] = DEFAULT_TEXTS,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Prompts of different lengths, left-padded into one batch, give each prompt's own last-token scores
    and greedy continuation (positions counted from the attention mask, as ``generate`` does)."""
    __tracebackhide__ = True
    import torch

    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("padding invariance", tolerance=tolerance)
    pad = pad_id(model, tokenizer)
    ids, mask, positions = padded_batch(tokenizer, prompts, model.device, pad)
    batch_last = forward_logits(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
    batch_generated = greedy_generate(model, tokenizer, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    for row, text in enumerate(prompts):
        alone_ids = encode(tokenizer, text, model.device)
        padding = int((mask[row] == 0).sum())
        # positions passed explicitly on both sides, counted as generate counts them (RoBERTa's own default differs)
        alone_positions = torch.arange(alone_ids.shape[1], device=model.device)[None]
        alone_last = forward_logits(model, alone_ids, position_ids=alone_positions)[0, -1:]
        mismatch = check_scores(result, alone_last, batch_last[row : row + 1], tolerance)
        if mismatch:
            cause = _padding_limitation(model, ids[row : row + 1], mask[row : row + 1])
            replay = Replay(
                Side(
                    "the prompt alone", lambda ids=alone_ids, at=alone_positions: model(input_ids=ids, position_ids=at)
                ),
                Side(
                    f"row {row} of the padded batch",
                    lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions),
                    row=row,
                    offset=-padding,
                ),
                (alone_ids.shape[1] - 1,),
            )
            raise mismatch_failure(
                f"padding changes scores: row {row} of a left-padded batch ({padding} pad tokens, id {pad}) "
                "gives different last-token scores than the prompt alone",
                model,
                tokenizer,
                [
                    ("prompt", repr(text)),
                    ("batch", f"{len(prompts)} prompts left-padded to {ids.shape[1]} tokens"),
                    *([("likely cause", cause)] if cause else []),
                ],
                mismatch,
                tolerance,
                position_label="row",
                replay=replay,
            )
        title = f"padding changes the greedy continuation of {text!r} ({padding} pad tokens)"
        _check_continuation(model, tokenizer, alone_ids, batch_generated[row], (ids, mask, row), title, result)
    return result


def _check_continuation(
    model: Any,
    tokenizer: Any,
    alone_ids: Any,
    batch_row: list[int],
    batch: tuple[Any, Any, int],
    title: str,
    result: CheckResult,
) -> None:
    """The prompt alone continues as its row of the padded batch did; a failure names a padding limitation."""
    __tracebackhide__ = True
    ids, mask, row = batch
    try:
        compare_continuations(
            model,
            tokenizer,
            alone_ids,
            greedy_loop_along(model, alone_ids, batch_row),
            batch_row,
            reference_label="prompt alone",
            other_label=f"row {row} of padded batch",
            tolerance=result.tolerance,
            result=result,
            title=title,
        )
    except AssertionError as exc:
        cause = _padding_limitation(model, ids[row : row + 1], mask[row : row + 1])
        if cause:
            exc.args = (f"{exc.args[0]}\n  likely cause : {cause}",)
        raise


def _padding_limitation(model: Any, padded_ids: Any, padded_mask: Any) -> str | None:
    """Why this model's design gives left-padded rows other answers, or None when it should not.

    A forward that does not use ``position_ids`` cannot be told where a
    left-padded row's tokens sit, so absolute positions shift with the padding; a
    recurrent model that also ignores ``attention_mask`` folds the pad tokens into
    its state. Either way batched generation with left padding gives users wrong
    text, so it is a failure with its cause, not a skip (a model repo may
    acknowledge it with causal_lm_known_limitations). Both are probed, not read from
    the signature: ``forward(**kwargs)`` hides what a custom model uses.
    """
    import torch

    name = type(model).__name__
    masked = forward_logits(model, padded_ids, attention_mask=padded_mask)[0, -1]
    # stretched, not shifted: rotary embeddings see only relative positions, which a uniform shift keeps
    stretched = torch.arange(padded_ids.shape[1], device=padded_ids.device)[None] * 2
    try:
        restretched = forward_logits(model, padded_ids, attention_mask=padded_mask, position_ids=stretched)[0, -1]
        uses_positions = not torch.equal(masked, restretched)
    except TypeError:
        uses_positions = False
    if uses_positions:
        return None
    if torch.equal(masked, forward_logits(model, padded_ids)[0, -1]):
        return f"{name}.forward uses neither attention_mask nor position_ids: pad tokens enter its state"
    return f"{name}.forward does not use position_ids: left padding shifts every token's position"


def assert_batch_independent(
    model: Any,
    tokenizer: Any,
    *,
    text: str = DEFAULT_TEXTS[0],
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> CheckResult:
    """A row's scores do not depend on the other rows: [A, B] and [A, C] give row A the same scores."""
    __tracebackhide__ = True
    import torch

    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("batch independence", tolerance=tolerance)
    row = encode(tokenizer, text, model.device)
    generator = torch.Generator().manual_seed(seed)
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    others = [torch.randint(0, high, row.shape, generator=generator).to(model.device) for _ in range(2)]
    alone = forward_logits(model, row)[0]
    for index, other in enumerate(others):
        batch = forward_logits(model, torch.cat([row, other], dim=0))
        mismatch = check_scores(result, alone, batch[0], tolerance)
        if mismatch:
            replay = Replay(
                Side("row 0 alone", lambda: model(input_ids=row)),
                Side(f"row 0 beside other row {index + 1}", lambda o=other: model(input_ids=torch.cat([row, o]))),
                (mismatch.first_position,),
            )
            raise mismatch_failure(
                f"rows are coupled: row 0's scores at position {mismatch.first_position} change with the other row of the batch",
                model,
                tokenizer,
                [
                    ("row 0", text_of(tokenizer, row[0])),
                    (f"other row ({index + 1})", text_of(tokenizer, other[0])),
                    ("prefix of moved position", text_of(tokenizer, row[0, : mismatch.first_position + 1])),
                    ("token there", token(tokenizer, int(row[0, mismatch.first_position]))),
                ],
                mismatch,
                tolerance,
                replay=replay,
            )
    return result
