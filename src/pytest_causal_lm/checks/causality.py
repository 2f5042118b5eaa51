"""Prefix causality: the scores at positions < k depend only on tokens 0..k-1.

The tutorial's example: the scores of ' dog' in "Hi dog" equal those in
"Hi dog how are you?". Generalised here to natural text and random ids,
appending one or several tokens, and changing single tokens or whole tails.
"""

from __future__ import annotations

from typing import Any

from ..tolerances import Tolerance
from ._common import (
    CheckResult,
    check_scores,
    encode,
    forward_logits,
    mismatch_failure,
    resolve_tolerance,
    text_of,
    token,
)
from ._localise import Replay, Side

__all__ = ["assert_prefix_causal"]


def _random_ids(generator: Any, count: int, low: int, high: int, device: Any) -> Any:
    import torch

    return torch.randint(low, high, (1, count), generator=generator).to(device)


def _different_token(generator: Any, original: int, high: int) -> int:
    import torch

    candidate = int(torch.randint(0, high - 1, (1,), generator=generator))
    return candidate + 1 if candidate >= original else candidate


def assert_prefix_causal(
    model: Any,
    tokenizer: Any,
    *,
    prefix: str = "Hi dog",
    continuation: str = " how are you?",
    random_length: int = 16,
    tolerance: Tolerance | None = None,
    seed: int = 0,
) -> CheckResult:
    """Scores at every position before a change are unchanged by that change.

    Checked on ``prefix + continuation`` (natural text) and on ``random_length``
    random ids: appending 1 and 4 tokens, changing one token at the start,
    middle and end, and replacing the second half.
    """
    __tracebackhide__ = True
    import torch

    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("prefix causality", tolerance=tolerance)
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    prefix_ids = encode(tokenizer, prefix, device)
    continuation_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    natural = torch.cat([prefix_ids, continuation_ids.to(device)], dim=1)
    random_ids = _random_ids(generator, random_length, 0, high, device)
    # the tutorial's "Hi dog" -> "Hi dog how are you?": a prefix's scores survive appending
    for label, base, kept in (
        ("natural text", natural, prefix_ids.shape[1]),
        ("random ids", random_ids, random_length // 2),
    ):
        base_scores = forward_logits(model, base)[0]
        for change, variant, unchanged in _changed_inputs(tokenizer, base, kept, generator, high):
            if unchanged == 0:
                continue
            actual = forward_logits(model, variant)[0, :unchanged]
            mismatch = check_scores(result, base_scores[:unchanged], actual, tolerance)
            if mismatch:
                replay = Replay(
                    Side("the input before the change", lambda base=base: model(input_ids=base)),
                    Side("the changed input", lambda variant=variant: model(input_ids=variant)),
                    (mismatch.first_position,),
                )
                described = f"{label}: {text_of(tokenizer, base[0])}"
                raise _causality_failure(model, tokenizer, described, base, change, mismatch, tolerance, replay)
    return result


def _changed_inputs(
    tokenizer: Any, base: Any, prefix_length: int, generator: Any, high: int
) -> list[tuple[str, Any, int]]:
    """``(what changed, changed ids, positions that must keep their scores)`` for every change made to ``base``."""
    import torch

    length = base.shape[1]
    cases: list[tuple[str, Any, int]] = [
        (f"extending the first {prefix_length} tokens to all {length}", base[:, :prefix_length], prefix_length)
    ]
    for extra in (1, 4):
        appended = torch.cat([base, _random_ids(generator, extra, 0, high, base.device)], dim=1)
        cases.append((f"appending {extra} token(s)", appended, length))
    for position in sorted({1, length // 2, length - 1}):
        changed = base.clone()
        old = int(changed[0, position])
        changed[0, position] = _different_token(generator, old, high)
        change = (
            f"changing position {position}: {token(tokenizer, old)} -> {token(tokenizer, int(changed[0, position]))}"
        )
        cases.append((change, changed, position))
    tail = base.clone()
    tail[0, length // 2 :] = _random_ids(generator, length - length // 2, 0, high, base.device)
    cases.append((f"replacing positions {length // 2}..{length - 1} with random ids", tail, length // 2))
    return cases


def _causality_failure(
    model: Any,
    tokenizer: Any,
    described: str,
    base: Any,
    change: str,
    mismatch: Any,
    tolerance: Tolerance,
    replay: Replay,
) -> AssertionError:
    moved = mismatch.first_position
    return mismatch_failure(
        f"prefix causality violated: scores at position {moved} changed after {change} "
        "(a position may only see tokens at or before it)",
        model,
        tokenizer,
        [
            ("input", described),
            ("change", change),
            ("prefix of moved position", text_of(tokenizer, base[0, : moved + 1])),
        ],
        mismatch,
        tolerance,
        replay=replay,
    )
