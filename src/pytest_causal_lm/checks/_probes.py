"""Probes two placements of one checkpoint must agree on, computed the same way on each: prompt scores, a
left-padded batch, cached decoding one token per step, and generate's greedy continuation.

Shared by the distributed invariants (tensor parallelism, device_map and offload) and the tensor-parallel
worker, which runs them in another process.
"""

from __future__ import annotations

from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kwargs,
    check_scores,
    encode,
    failure,
    first_difference,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    returned_cache,
    token,
)
from ._generation import (
    generate_scored,
)

__all__ = [
    "compare_probes",
    "follow_modules",
    "parity_probes",
    "spread_over",
]


def parity_probes(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What both sides compute, on the CPU: prompt scores, a left-padded batch's scores (with its mask), cached
    decoding one token per step, and generate's greedy tokens with their step scores."""
    import torch

    prompt = encode(tokenizer, DEFAULT_TEXTS[1], model.device)
    ids, mask, positions = padded_batch(tokenizer, DEFAULT_TEXTS, model.device, pad_id(model, tokenizer))
    steps, cache = [], None
    with torch.no_grad():
        for position in range(prompt.shape[1]):
            out = model(input_ids=prompt[:, position : position + 1], use_cache=True, **cache_kwargs(model, cache))
            cache = returned_cache(out)
            steps.append(out.logits[0, -1].float().cpu())
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().cpu()
    greedy = generate_scored(model, tokenizer, encode(tokenizer, DEFAULT_TEXTS[0], model.device), max_new_tokens=8)
    return {
        "prompt": forward_logits(model, prompt)[0].cpu(),
        "padded": padded,
        "mask": mask.cpu(),
        "decoded": torch.stack(steps),
        "greedy_tokens": greedy.rows[0],
        "greedy_scores": greedy.logits[0],
    }


def follow_modules(model: Any, where: list[str]) -> None:
    """Keep ``where[0]`` on the innermost module the forward is in, so an error can name it."""
    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_pre_hook(lambda _m, _a, name=name: where.__setitem__(0, name))


def compare_probes(
    model: Any,
    tokenizer: Any,
    result: CheckResult,
    expected: dict[str, Any],
    actual: dict[str, Any],
    tolerance: Tolerance,
    how: str,
    label: str,
    differ: str = "differ from the single process's",
) -> None:
    """Every probe of ``parity_probes`` of another placement against the session model's; a failure reads
    ``{label}: the scores of {probe} {differ}``."""
    __tracebackhide__ = True
    rows = [
        ("a prompt", expected["prompt"], actual["prompt"]),
        ("cached decoding, one token per step", expected["decoded"], actual["decoded"]),
        *(
            (
                f"a left-padded batch, row {row} of {len(expected['mask'])}",
                expected["padded"][row][kept],
                actual["padded"][row][kept],
            )
            for row, kept in enumerate(expected["mask"].bool())
        ),
    ]
    for what, wanted, got in rows:
        mismatch = check_scores(result, wanted, got, tolerance)
        if mismatch:
            raise mismatch_failure(
                f"{label}: the scores of {what} {differ}",
                model,
                tokenizer,
                [("probe", f"{what} ({how})")],
                mismatch,
                tolerance,
            )
    _compare_greedy(model, tokenizer, result, expected, actual, tolerance, label)


def spread_over(model: Any) -> set[str]:
    """The devices accelerate spread ``model`` over (``hf_device_map``); one or none for a one-device model."""
    return set(map(str, getattr(model, "hf_device_map", {}).values()))


def _compare_greedy(
    model: Any, tokenizer: Any, result: CheckResult, expected: dict, actual: dict, tolerance: Tolerance, label: str
) -> None:
    __tracebackhide__ = True
    mine, theirs = expected["greedy_tokens"], actual["greedy_tokens"]
    step = first_difference(mine, theirs)
    if step is None:
        return
    scores = expected["greedy_scores"][step]
    top2 = scores.topk(2).values
    if float(top2[0] - top2[1]) <= tolerance.bound(float(top2[0].abs())):
        result.near_tie = True
        result.note(f"greedy continuations part at a near-tie, step {step}")
        return
    raise failure(
        f"{label}: generate's greedy continuation differs at step {step}",
        model,
        [
            ("prompt", repr(DEFAULT_TEXTS[0])),
            ("session model", [token(tokenizer, t) for t in mine[step : step + 3]]),
            (label, [token(tokenizer, t) for t in theirs[step : step + 3]]),
            ("top-2 margin there", f"{float(top2[0] - top2[1]):.3g} (not a near-tie)"),
        ],
        figure=("step", step),
    )
