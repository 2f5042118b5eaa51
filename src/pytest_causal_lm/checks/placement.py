"""device_map and offload: the model spread by accelerate scores as the model on one device.

``from_pretrained(device_map="auto", max_memory=...)`` places layers on devices, the CPU and disk, and hooks
move weights in just before each module runs. Code that reads a weight outside its own module's forward (a
device taken from ``self.norm.weight``, a head computed from another module's weight), a buffer left on the meta
device, or a cache moved to the wrong device breaks only there. The probes of the tensor-parallel invariant run
on both placements and must agree: a prompt, a left-padded batch, cached decoding and greedy ``generate``.
"""

from __future__ import annotations

import gc
import tempfile
from collections import Counter
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import CheckResult, failure, resolve_tolerance
from .tensor_parallel import compare_probes, follow_modules, parity_probes, spread_over

__all__ = ["assert_offload_matches", "offload_map", "single_device_room"]


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


def assert_offload_matches(
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
        finally:
            del other
            gc.collect()
    result = CheckResult("device_map parity", tolerance=tolerance)
    compare_probes(
        model, tokenizer, result, expected, actual, tolerance, how, "device_map", "differ between placements"
    )
    result.note(how)
    return result
