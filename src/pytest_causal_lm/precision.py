"""Every dtype judged against the target's own measured rounding noise.

A 36-layer model in bfloat16 carries rounding noise of tenths of a logit, and a
7-8B model in float32 carries more than float32's table tolerance; a fixed
per-dtype tolerance either flags that noise or hides real bugs on small models.
So the scores of a few prompts are computed twice on the same weights: in the
run dtype and in the next wider one (float32 for half precision, float64 for
float32; the weights are upcast, which is exact, and the original tensors put back after).
The greatest difference is the target's noise floor, and comparisons in the run
dtype allow a multiple of it, never less than the table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .tolerances import Tolerance

__all__ = [
    "FLOAT32_NOISE_FACTOR",
    "NOISE_FACTOR",
    "NoiseFloor",
    "calibrated_tolerance",
    "measure_noise_floor",
    "room_for",
    "weights_in",
]

# Two half-precision computations of one score each sit within the noise floor of float32, so they may
# differ by twice it; measured on SmolLM2 in bfloat16, the suite's own comparisons stayed under 0.4x the floor.
NOISE_FACTOR = 2.0
# float32's floor is measured on short prompts, while its comparisons run longer and random inputs: measured on
# SmolLM2-135M, the floor is 5.5e-5 and prefix causality on 64 random ids reaches 1.45x it, so 4x keeps a healthy
# model's greatest figure under 0.4 of the bound.
FLOAT32_NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class NoiseFloor:
    """The greatest score difference between the run dtype and a wider one on the same weights and inputs."""

    value: float
    dtype: str
    seconds: float
    reference: str = "float32"

    def __str__(self) -> str:
        return f"noise floor {self.value:.3g} ({self.dtype} vs {self.reference}, measured in {self.seconds:.1f} s)"

    @property
    def factor(self) -> float:
        """How many times the floor two computations in this dtype may differ by."""
        return FLOAT32_NOISE_FACTOR if self.dtype == "float32" else NOISE_FACTOR


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes_free(device: Any) -> int | None:
    """Free memory on ``device``: the CUDA allocator's view, or MemAvailable for the CPU; None if unknown."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def room_for(model: Any, dtype: Any) -> tuple[bool, str]:
    """Whether ``model``'s weights fit in ``dtype`` next to what is loaded, and what that costs."""
    import torch

    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1 or devices & {"disk", "meta"}:
        return False, f"the weights are spread over {sorted(map(str, devices))} by device_map"
    target = torch.empty((), dtype=dtype).element_size()
    extra = sum(p.numel() * target for p in model.parameters())  # the cast copy, next to the kept originals
    free = _bytes_free(model.device)
    cost = f"{extra / 1e9:.2f} GB more while it runs"
    if free is not None and extra * 1.2 > free:
        return False, f"{cost}, {free / 1e9:.2f} GB free on {model.device}"
    return True, cost


@contextmanager
def weights_in(model: Any, dtype: Any) -> Iterator[None]:
    """Cast the weights to ``dtype`` for the block, then put the original tensors back.

    Casting back would not restore them: float32 buffers computed at load (RoPE's ``inv_freq``) lose bits in a
    half-precision round trip, which moved SmolLM2's float32 scores by 0.095 for the rest of the session. Putting
    the tensors back is exact, and saves a pass over the weights.
    """
    kept = [
        (store, name, tensor, tensor.data)
        for module in model.modules()
        for store in (module._parameters, module._buffers)
        for name, tensor in store.items()
        if tensor is not None
    ]
    model.to(dtype)
    try:
        yield
    finally:
        for store, name, tensor, data in kept:
            tensor.data = data  # the object may be the one cast in place (parameters) or replaced (buffers)
            store[name] = tensor


def _scores(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    from .checks._common import encode, forward_logits

    return [forward_logits(model, encode(tokenizer, text, model.device))[0].cpu() for text in texts]


def _wider(dtype: Any, device: Any) -> Any:
    """The dtype to measure ``dtype``'s rounding against, or None (float64 runs, float32 where float64 is missing)."""
    import torch

    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype == torch.float32 and getattr(device, "type", str(device)) != "mps":
        return torch.float64
    return None


def measure_noise_floor(model: Any, tokenizer: Any, texts: Sequence[str] | None = None) -> NoiseFloor | None:
    """The target's rounding noise in its run dtype, or None when there is no wider dtype to measure against
    here (or the model's kernels cannot run in it), the weights cannot be upcast next to what is loaded, or the
    model is not deterministic (noise that
    random would hide every bug)."""
    import torch

    from .checks._common import DEFAULT_TEXTS

    texts = DEFAULT_TEXTS if texts is None else texts
    wider = _wider(model.dtype, model.device)
    if wider is None or not room_for(model, wider)[0]:
        return None
    start = time.perf_counter()
    run = _scores(model, tokenizer, texts)
    if not torch.equal(run[0], _scores(model, tokenizer, texts[:1])[0]):
        return None
    try:
        with weights_in(model, wider):
            exact = _scores(model, tokenizer, texts)
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # a kernel without the wider dtype (torch's grouped MoE matmul has no float64): keep the table
    value = max(float((a - b).abs().nan_to_num(nan=float("inf")).max()) for a, b in zip(run, exact, strict=True))
    return NoiseFloor(value, _dtype_name(model.dtype), time.perf_counter() - start, _dtype_name(wider))


def calibrated_tolerance(base: Tolerance, noise: NoiseFloor | None) -> Tolerance:
    """``base`` with its absolute part raised to the noise floor's factor x the floor (never lowered)."""
    if noise is None or noise.value == float("inf"):
        return base
    return Tolerance(
        atol=max(base.atol, noise.factor * noise.value),
        rtol=base.rtol,
        noise=noise.value,
        noise_source=f"{noise}; atol = max(table {base.atol:g}, {noise.factor:g}x the floor)",
    )
