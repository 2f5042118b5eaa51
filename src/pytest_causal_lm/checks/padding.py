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
    padded_rows,
    resolve_tolerance,
    text_of,
    token,
    uses_position_ids,
)
from ._generation import compare_continuations, greedy_generate, greedy_loop_along
from ._localise import Replay, Side

__all__ = ["assert_batch_independent", "assert_padding_invariant"]


# Servers batch 8, 16, 32 rows, and kernels pick another path by batch size: the second batch is this large.
LARGE_BATCH = 16


def assert_padding_invariant(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str] = DEFAULT_TEXTS,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> CheckResult:
    """Prompts of different lengths, left-padded into one batch, give each prompt's own last-token scores
    and greedy continuation (positions counted from the attention mask, as ``generate`` does); so do the same
    prompts among ``LARGE_BATCH`` rows of mixed lengths (random ids fill the rest)."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("padding invariance", tolerance=tolerance)
    pad = pad_id(model, tokenizer)
    rows = [tokenizer(text)["input_ids"] for text in prompts]
    every_row = [*rows, *_random_rows(model, tokenizer, rows, seed)]
    alone = [_alone_last(model, tokens) for tokens in every_row]  # each row's own scores, once for both batches
    ids, mask = _check_rows_alone(model, tokenizer, (rows, alone), pad, result)
    batch_generated = greedy_generate(model, tokenizer, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    for row, text in enumerate(prompts):
        alone_ids = encode(tokenizer, text, model.device)
        padding = int((mask[row] == 0).sum())
        title = f"padding changes the greedy continuation of {text!r} ({padding} pad tokens)"
        _check_continuation(model, tokenizer, alone_ids, batch_generated[row], (ids, mask, row), title, result)
    _check_rows_alone(model, tokenizer, (every_row, alone), pad, result)
    result.note(f"left-padded batches of {len(rows)} and {LARGE_BATCH} rows")
    return result


def _random_rows(model: Any, tokenizer: Any, rows: list[list[int]], seed: int) -> list[list[int]]:
    """Rows of random ordinary ids (no special token: some models read a pad id as padding) whose lengths
    spread from 2 to the longest prompt, filling the batch up to ``LARGE_BATCH``."""
    import torch

    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(high) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    longest = max(len(row) for row in rows)
    count = LARGE_BATCH - len(rows)
    lengths = [2 + (longest - 2) * index // max(count - 1, 1) for index in range(count)]
    picks = [torch.randint(0, len(ordinary), (length,), generator=generator) for length in lengths]
    return [ordinary[pick].tolist() for pick in picks]


def _alone(model: Any, tokens: list[int]) -> dict[str, Any]:
    """One row alone, its positions passed explicitly and counted as generate counts them (RoBERTa's own default
    differs)."""
    import torch

    ids = torch.tensor([tokens], device=model.device)
    return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1], device=model.device)[None]}


def _alone_last(model: Any, tokens: list[int]) -> Any:
    return forward_logits(model, **_alone(model, tokens))[0, -1:]


def _check_rows_alone(
    model: Any, tokenizer: Any, rows_alone: tuple[list[list[int]], list[Any]], pad: int, result: CheckResult
) -> tuple[Any, Any]:
    """Each row's last-token scores in the left-padded batch of the rows equal its scores alone (given); the batch."""
    __tracebackhide__ = True
    rows, alone = rows_alone
    ids, mask, positions = padded_rows(rows, model.device, pad)
    batch_last = forward_logits(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
    for row, tokens in enumerate(rows):
        mismatch = check_scores(result, alone[row], batch_last[row : row + 1], result.tolerance)
        if mismatch:
            padding = int((mask[row] == 0).sum())
            replay = Replay(
                Side("the prompt alone", lambda t=tokens: model(**_alone(model, t))),
                Side(
                    f"row {row} of the padded batch",
                    lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions),
                    row=row,
                    offset=-padding,
                ),
                (len(tokens) - 1,),
            )
            raise _padding_failure(model, tokenizer, (ids, mask, row), pad, mismatch, result.tolerance, replay)
    return ids, mask


def _padding_failure(
    model: Any,
    tokenizer: Any,
    batch: tuple[Any, Any, int],
    pad: int,
    mismatch: Any,
    tolerance: Tolerance,
    replay: Replay,
) -> AssertionError:
    ids, mask, row = batch
    padding = int((mask[row] == 0).sum())
    cause = _padding_limitation(model, ids[row : row + 1], mask[row : row + 1])
    return mismatch_failure(
        f"padding changes scores: row {row} of a left-padded batch ({padding} pad tokens, id {pad}) "
        "gives different last-token scores than the prompt alone",
        model,
        tokenizer,
        [
            ("prompt", text_of(tokenizer, ids[row][mask[row] == 1])),
            ("batch", f"{ids.shape[0]} rows left-padded to {ids.shape[1]} tokens"),
            *([("likely cause", cause)] if cause else []),
        ],
        mismatch,
        tolerance,
        position_label="row",
        replay=replay,
    )


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
    if uses_position_ids(model, padded_ids, attention_mask=padded_mask):
        return None
    masked = forward_logits(model, padded_ids, attention_mask=padded_mask)[0, -1]
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
    """A row's scores do not depend on the other rows: [A, B] and [A, C] give row A the same scores, and so does
    a batch of ``LARGE_BATCH`` rows with A in the middle (kernels pick another path by batch size)."""
    __tracebackhide__ = True
    import torch

    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("batch independence", tolerance=tolerance)
    row = encode(tokenizer, text, model.device)
    generator = torch.Generator().manual_seed(seed)
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    others = [torch.randint(0, high, row.shape, generator=generator).to(model.device) for _ in range(LARGE_BATCH)]
    alone = forward_logits(model, row)[0]
    middle = LARGE_BATCH // 2
    batches = [(0, [row, others[0]]), (0, [row, others[1]]), (middle, [*others[:middle], row, *others[middle + 1 :]])]
    for at, rows in batches:
        batch = torch.cat(rows, dim=0)
        mismatch = check_scores(result, alone, forward_logits(model, batch)[at], tolerance)
        if mismatch:
            raise _coupled_failure(model, tokenizer, row, (batch, at), mismatch, tolerance)
    result.note(f"batches of 2 and {LARGE_BATCH} rows")
    return result


def _coupled_failure(
    model: Any, tokenizer: Any, row: Any, batch: tuple[Any, int], mismatch: Any, tolerance: Tolerance
) -> AssertionError:
    rows, at = batch
    moved = mismatch.first_position
    replay = Replay(
        Side("the row alone", lambda: model(input_ids=row)),
        Side(f"row {at} of the batch of {rows.shape[0]}", lambda: model(input_ids=rows), row=at),
        (moved,),
    )
    neighbour = rows[1 if at == 0 else 0]
    return mismatch_failure(
        f"rows are coupled: row {at}'s scores at position {moved} change with the other rows of a batch of "
        f"{rows.shape[0]}",
        model,
        tokenizer,
        [
            (f"row {at}", text_of(tokenizer, row[0])),
            ("another row", text_of(tokenizer, neighbour)),
            ("prefix of moved position", text_of(tokenizer, row[0, : moved + 1])),
            ("token there", token(tokenizer, int(row[0, moved]))),
        ],
        mismatch,
        tolerance,
        replay=replay,
    )
