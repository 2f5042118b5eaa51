"""Probes two placements of one checkpoint must agree on, computed the same way on each: prompt scores, a
left-padded batch, cached decoding one token per step, and generate's greedy continuation.

Shared by the distributed invariants (tensor parallelism, device_map and offload) and the tensor-parallel
worker, which runs them in another process.
"""

from __future__ import annotations

from collections.abc import Callable
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
from ._localise import Side

__all__ = [
    "compare_probes",
    "follow_modules",
    "parity_probes",
    "probe_side",
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


def probe_side(model: Any, tokenizer: Any, probe: str, row: int, position: int, label: str) -> Side:
    """The forward of ``parity_probes`` that computes ``probe`` (row ``row``) at ``position``, replayable on
    ``model``: the prompt's forward, cached decoding up to that step, or the left-padded batch."""
    prompt = encode(tokenizer, DEFAULT_TEXTS[1], model.device)
    if probe == "prompt":
        return Side(label, lambda: model(input_ids=prompt), model=model)
    if probe == "decoded":

        def decode() -> None:
            cache = None
            for at in range(position + 1):
                step = prompt[:, at : at + 1]
                cache = returned_cache(model(input_ids=step, use_cache=True, **cache_kwargs(model, cache)))

        return Side(label, decode, call=position, offset=position, model=model)
    ids, mask, positions = padded_batch(tokenizer, DEFAULT_TEXTS, model.device, pad_id(model, tokenizer))
    return Side(label, lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions), row=row, model=model)


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
    localise: Callable[[str, int, int], list[tuple[str, object]]] | None = None,
) -> None:
    """Every probe of ``parity_probes`` of another placement against the session model's; a failure reads
    ``{label}: the scores of {probe} {differ}``. ``localise(probe, row, position)``: where the placements part
    (the first departing module), asked only on failure."""
    __tracebackhide__ = True
    rows = [
        ("a prompt", ("prompt", 0, 0), expected["prompt"], actual["prompt"]),
        ("cached decoding, one token per step", ("decoded", 0, 0), expected["decoded"], actual["decoded"]),
        *(
            (
                f"a left-padded batch, row {row} of {len(expected['mask'])}",
                ("padded", row, int((~kept).sum())),
                expected["padded"][row][kept],
                actual["padded"][row][kept],
            )
            for row, kept in enumerate(expected["mask"].bool())
        ),
    ]
    for what, (probe, row, pads), wanted, got in rows:
        mismatch = check_scores(result, wanted, got, tolerance)
        if mismatch:
            where = (probe, row, pads + mismatch.first_position)
            raise mismatch_failure(
                f"{label}: the scores of {what} {differ}",
                model,
                tokenizer,
                [("probe", f"{what} ({how})")],
                mismatch,
                tolerance,
                replay=(lambda where=where: localise(*where)) if localise else None,
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
