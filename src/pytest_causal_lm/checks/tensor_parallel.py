"""Tensor parallelism: the model sharded over N processes with transformers' own plan scores as one process does.

``from_pretrained(tp_plan="auto")`` under ``torchrun`` (gloo on CPU, nccl on GPUs) is a separate code path with
its own bugs: a plan entry that shards a projection along the wrong dimension, a row-parallel layer whose partial
sums are never all-reduced, a gather that drops a slice. The same probes run in the session's single-process model
and in N worker processes (``pytest_causal_lm.tp_worker``): every position's scores on a prompt and on a
left-padded batch, cached decoding step by step, and the greedy continuation of ``generate``. A different
reduction order is noise within the run dtype's tolerance; a wrong shard is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kwargs,
    check_scores,
    encode,
    failure,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
    returned_cache,
    token,
)
from .greedy import generate_scored

__all__ = [
    "assert_tensor_parallel_matches",
    "compare_probes",
    "follow_modules",
    "parity_probes",
    "spread_over",
    "tp_unsupported",
]

WORKER_TIMEOUT_SECONDS = 900


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


def tp_unsupported(model: Any, processes: int) -> str | None:
    """Why ``model`` cannot be sharded over ``processes`` with its own plan, or None."""
    plan = getattr(model, "_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None)
    if not plan and not getattr(model, "supports_tp_plan", False):
        return f"{type(model).__name__} declares no tensor-parallel plan (base_model_tp_plan)"
    text = model.config.get_text_config()
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, name, None)
        if isinstance(heads, int) and heads % processes:
            return f"{name}={heads} does not divide over {processes} tensor-parallel processes"
    return None


def assert_tensor_parallel_matches(
    model: Any,
    tokenizer: Any,
    *,
    processes: int,
    location: str,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """``location`` loaded with ``tp_plan="auto"`` in ``processes`` torchrun workers gives ``model``'s scores on
    every probe of ``parity_probes`` and its greedy tokens. A worker's failure (rank, module, error)
    is this check's failure. Skips where the architecture has no plan or ``processes`` does not divide its heads."""
    __tracebackhide__ = True
    why = tp_unsupported(model, processes)
    if why:
        pytest.skip(f"tensor parallelism: {why}")
    tolerance = resolve_tolerance(model, tolerance)
    expected = parity_probes(model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="causal-lm-tp-") as work:
        sharded = _run_workers(model, location, processes, from_pretrained_kwargs or {}, Path(work))
    result = CheckResult("tensor parallel", tolerance=tolerance)
    how = f"{processes} processes, tp_plan='auto', {_backend(model)}; reference: {_reference(model)}"
    compare_probes(model, tokenizer, result, expected, sharded, tolerance, how, "tensor parallelism")
    result.note(how)
    return result


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


def _reference(model: Any) -> str:
    """What the sharded model is compared with: the session's model, on one device or spread by device_map
    (a checkpoint too big for one device is compared with its device_map placement)."""
    spread = spread_over(model)
    if len(spread) > 1:
        return f"the session's single-process model, spread by device_map over {', '.join(sorted(spread))}"
    return f"the session's single-process model on {model.device}"


def _backend(model: Any) -> str:
    return "nccl" if str(model.device).startswith("cuda") else "gloo"


def _run_workers(model: Any, location: str, processes: int, kwargs: dict[str, Any], work: Path) -> dict[str, Any]:
    """torchrun the worker; its probes, or a failure naming the rank, the module and the error. A run in which
    no rank got as far as reporting (the launcher's rendezvous lost a race for its port under load) is retried
    once before it counts."""
    __tracebackhide__ = True
    import torch

    request = {"location": location, "kwargs": kwargs, "dtype": str(model.dtype).removeprefix("torch.")}
    (work / "request.json").write_text(json.dumps(request))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    command += ["--standalone", "-m", "pytest_causal_lm.tp_worker", str(work)]  # --standalone: a free port
    for attempt in (1, 2):
        done = _launch(model, command, processes)
        errors = sorted(work.glob("error-rank*.txt"))
        if done.returncode == 0 and not errors and (work / "probes.pt").exists():
            return torch.load(work / "probes.pt")
        if errors or attempt == 2:
            break
    raise failure(
        "tensor parallelism: the worker failed "
        + (f"on rank {errors[0].stem.removeprefix('error-rank')}" if errors else "to start (twice)"),
        model,
        [
            ("error", errors[0].read_text().strip() if errors else _root_cause(done.stderr)),
            ("processes", processes),
            ("exit status", done.returncode),
        ],
    )


def _launch(model: Any, command: list[str], processes: int) -> Any:
    __tracebackhide__ = True
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_SECONDS, env=env)
    except subprocess.TimeoutExpired:
        raise failure(
            f"tensor parallelism: the {processes} workers did not finish in {WORKER_TIMEOUT_SECONDS} s",
            model,
            [("command", " ".join(command))],
        ) from None


def _root_cause(text: str) -> str:
    """The launcher's own error line (the last that names an error), else its last line of output."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("W1", "I1", "*"))]
    named = [line for line in lines if "Error" in line or "error:" in line.lower()]
    return (named or lines or ["no output"])[-1][:400]


def _compare_greedy(
    model: Any, tokenizer: Any, result: CheckResult, expected: dict, actual: dict, tolerance: Tolerance, label: str
) -> None:
    __tracebackhide__ = True
    mine, theirs = expected["greedy_tokens"], actual["greedy_tokens"]
    step = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
    if step is None and len(mine) == len(theirs):
        return
    step = min(len(mine), len(theirs)) if step is None else step
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
