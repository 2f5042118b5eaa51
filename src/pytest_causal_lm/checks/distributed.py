"""Models that outgrow one device: the checkpoint sharded or spread scores as the session's model does.

Tensor parallelism: the model sharded over N processes with transformers' own plan scores as one process does.

``from_pretrained(tp_plan="auto")`` under ``torchrun`` (gloo on CPU, nccl on GPUs) is a separate code path with
its own bugs: a plan entry that shards a projection along the wrong dimension, a row-parallel layer whose partial
sums are never all-reduced, a gather that drops a slice. The same probes run in the session's single-process model
and in N worker processes (``pytest_causal_lm.tp_worker``): every position's scores on a prompt and on a
left-padded batch, cached decoding step by step, and the greedy continuation of ``generate``. A different
reduction order is noise within the run dtype's tolerance; a wrong shard is not.

device_map and offload: the model spread by accelerate scores as the model on one device.

``from_pretrained(device_map="auto", max_memory=...)`` places layers on devices, the CPU and disk, and hooks
move weights in just before each module runs. Code that reads a weight outside its own module's forward (a
device taken from ``self.norm.weight``, a head computed from another module's weight), a buffer left on the meta
device, or a cache moved to the wrong device breaks only there. The probes of the tensor-parallel invariant run
on both placements and must agree: a prompt, a left-padded batch, cached decoding and greedy ``generate``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    CheckResult,
    failure,
    resolve_tolerance,
)
from ._localise import Replay, Trace, departure_rows, localisation_rows, not_located, record, within
from ._probes import compare_probes, follow_modules, parity_probes, probe_side, spread_over

__all__ = [
    "WORKER_TIMEOUT_SECONDS",
    "assert_device_map_parity",
    "assert_tensor_parallel_matches",
    "offload_map",
    "single_device_room",
    "tp_unsupported",
]


WORKER_TIMEOUT_SECONDS = 900


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
    request = {"location": location, "kwargs": from_pretrained_kwargs or {}}
    sharded = _sharded(model, request, processes)
    result = CheckResult("tensor parallel", tolerance=tolerance)
    how = f"{processes} processes, tp_plan='auto', {_backend(model)}; reference: {_reference(model)}"
    localise = _shards_localised(model, tokenizer, request, processes, tolerance)
    compare_probes(model, tokenizer, result, expected, sharded, tolerance, how, "tensor parallelism", localise=localise)
    result.note(how)
    return result


def _reference(model: Any) -> str:
    """What the sharded model is compared with: the session's model, on one device or spread by device_map
    (a checkpoint too big for one device is compared with its device_map placement)."""
    spread = spread_over(model)
    if len(spread) > 1:
        return f"the session's single-process model, spread by device_map over {', '.join(sorted(spread))}"
    return f"the session's single-process model on {model.device}"


def _backend(model: Any) -> str:
    return "nccl" if str(model.device).startswith("cuda") else "gloo"


def _shards_localised(
    model: Any, tokenizer: Any, request: dict[str, Any], processes: int, tolerance: Tolerance
) -> Callable[[str, int, int], list[tuple[str, object]]]:
    """Where the shards part from one process on a failing probe: the workers are started again to replay it
    with every module recorded (only after a failure), and the session's model replays it here."""

    def localise(probe: str, row: int, position: int) -> list[tuple[str, object]]:
        asked = {"probe": probe, "row": row, "position": position}
        try:
            ours = record(probe_side(model, tokenizer, probe, row, position, "one process"), model, [position])
            theirs = Trace.from_plain(_sharded(model, {**request, "record": asked}, processes)["trace"])
        except Exception as exc:
            return not_located(exc)
        return departure_rows(ours, theirs, ("one process", "the shards"), [position], within(tolerance))

    return localise


def _sharded(model: Any, request: dict[str, Any], processes: int) -> dict[str, Any]:
    """What the workers return for ``request`` (the probes, or a recorded replay of one)."""
    __tracebackhide__ = True
    with tempfile.TemporaryDirectory(prefix="causal-lm-tp-") as work:
        return _run_workers(model, request, processes, Path(work))


def _run_workers(model: Any, request: dict[str, Any], processes: int, work: Path) -> dict[str, Any]:
    """torchrun the worker; its probes, or a failure naming the rank, the module and the error. A run in which
    no rank got as far as reporting (the launcher's rendezvous lost a race for its port under load) is retried
    once before it counts."""
    __tracebackhide__ = True
    import torch

    request = {**request, "dtype": str(model.dtype).removeprefix("torch.")}
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


def offload_map(model: Any) -> dict[str, Any] | None:
    """A device map, from accelerate's own ``infer_auto_device_map``, that keeps the first modules on the
    model's device (and the CPU, under an accelerator) and sends the rest to disk: the smallest memory share
    that does both. None when no share does (accelerate keeps such a model whole)."""
    from accelerate import infer_auto_device_map

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device = next(model.parameters()).device
    for share in (0.2, 0.35, 0.5, 0.65, 0.8, 0.9):
        budget = int(size * share)
        memory = {device.index or 0: budget, "cpu": budget} if device.type == "cuda" else {"cpu": budget}
        mapping = infer_auto_device_map(
            model, max_memory=memory, no_split_module_classes=list(model._no_split_modules or [])
        )
        places = set(map(str, mapping.values()))
        if "disk" in places and len(places) > 1:
            return mapping
    return None


def single_device_room(model: Any) -> str | None:
    """Why a one-device copy of a spread ``model`` cannot be loaded on the CPU beside it, or None."""
    import os

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX sysconf: assume it fits, as accelerate would try
        return None
    if size * 1.2 < free:
        return None
    return f"the one-device model does not fit: its weights need {size / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def _offloaded(model: Any) -> dict[str, Any]:
    mapping = offload_map(model)
    if mapping is None:
        pytest.skip("device_map parity: accelerate keeps this model whole at every memory share tried")
    return {"device_map": mapping}


def _device_of(model: Any, name: str) -> str:
    """Where accelerate put module ``name`` (its entry in hf_device_map, or the entry of a parent)."""
    mapping = getattr(model, "hf_device_map", {})
    parents = [key for key in mapping if key == "" or name == key or name.startswith(key + ".")]
    return str(mapping[max(parents, key=len)]) if parents else "an unmapped device"


def _placements(model: Any) -> str:
    counts = Counter(str(v) for v in getattr(model, "hf_device_map", {}).values())
    return ", ".join(f"{n} on {device}" for device, n in sorted(counts.items())) or "one device"


def _compare_placements(
    model: Any, other: Any, tokenizer: Any, probes: tuple[dict, dict], tolerance: Tolerance, how: str
) -> CheckResult:
    """The second load's probes against the session model's; a failure replays both placements (the second
    load is still alive) to name the first module that departs."""
    __tracebackhide__ = True
    result = CheckResult("device_map parity", tolerance=tolerance)
    placed = ((model, "the session's model"), (other, "the second load"))

    def localise(probe: str, row: int, position: int) -> list[tuple[str, object]]:
        sides = [probe_side(m, tokenizer, probe, row, position, label) for m, label in placed]
        return localisation_rows(model, Replay(*sides, (position,)), within(tolerance))

    expected, actual = probes
    differ = "differ between placements"
    compare_probes(model, tokenizer, result, expected, actual, tolerance, how, "device_map", differ, localise)
    return result


def assert_device_map_parity(
    model: Any,
    tokenizer: Any,
    *,
    location: str,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """``model`` and the same checkpoint in the other placement agree on every probe: a model on one device is
    compared with a second load that accelerate spreads over the device, the CPU and disk (``offload_map``; or
    ``device_map="auto"`` under ``max_memory`` when given, default ``offload_map``); a model that is already spread, with a second load on one device."""
    __tracebackhide__ = True
    import importlib.util

    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is None:
        raise failure(
            "device_map parity needs the accelerate package",
            model,
            [("fix", "pip install 'pytest-causal-lm[offload]'")],
        )
    tolerance = resolve_tolerance(model, tolerance)
    kwargs = {**(from_pretrained_kwargs or {}), "dtype": model.dtype}
    expected = parity_probes(model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="causal-lm-offload-") as folder:
        if len(spread_over(model)) > 1:
            other = AutoModelForCausalLM.from_pretrained(location, **kwargs).eval()
        else:
            placement = {"device_map": "auto", "max_memory": max_memory} if max_memory else _offloaded(model)
            other = AutoModelForCausalLM.from_pretrained(location, offload_folder=folder, **placement, **kwargs).eval()
        how = f"the session's model ({_placements(model)}) against a second load ({_placements(other)})"
        where = ["the first forward"]
        follow_modules(other, where)
        try:
            actual = parity_probes(other, tokenizer)
        except Exception as exc:
            raise failure(
                f"device_map: the model raises in {where[0]} once accelerate places its layers",
                model,
                [
                    ("placement", how),
                    ("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"),
                    ("where", f"{where[0]}, on {_device_of(other, where[0])}"),
                ],
            ) from None
        else:
            result = _compare_placements(model, other, tokenizer, (expected, actual), tolerance, how)
        finally:
            del other
            gc.collect()
    result.note(how)
    return result
