"""Half precision judged against its own measured rounding noise.

A 36-layer model in bfloat16 carries rounding noise of tenths of a logit; a
fixed per-dtype tolerance either flags that noise or hides real bugs on small
models. So, when the run dtype is not float32, the scores of a few prompts are
computed twice on the same weights: in the run dtype and in float32 (the
weights are upcast in place, which is exact, and cast back after). The
greatest difference is the target's noise floor, and comparisons in that dtype
allow a multiple of it. float32 stays exactly as strict as the table says.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .tolerances import Tolerance

__all__ = ["NOISE_FACTOR", "NoiseFloor", "calibrated_tolerance", "measure_noise_floor", "room_for", "weights_in"]

# Two half-precision computations of one score each sit within the noise floor of float32, so they may
# differ by twice it; measured on SmolLM2 in bfloat16, the suite's own comparisons stayed under 0.4x the floor.
NOISE_FACTOR = 2.0


@dataclass(frozen=True)
class NoiseFloor:
    """The greatest score difference between the run dtype and float32 on the same weights and inputs."""

    value: float
    dtype: str
    seconds: float

    def __str__(self) -> str:
        return f"noise floor {self.value:.3g} ({self.dtype} vs float32, measured in {self.seconds:.1f} s)"


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
    extra = sum(p.numel() * max(target - p.element_size(), 0) for p in model.parameters())
    free = _bytes_free(model.device)
    cost = f"{extra / 1e9:.2f} GB more while it runs"
    if free is not None and extra * 1.2 > free:
        return False, f"{cost}, {free / 1e9:.2f} GB free on {model.device}"
    return True, cost


@contextmanager
def weights_in(model: Any, dtype: Any) -> Iterator[None]:
    """Cast the weights to ``dtype`` for the block and back after (bfloat16/float16 -> float32 -> back is exact)."""
    original = model.dtype
    model.to(dtype)
    try:
        yield
    finally:
        model.to(original)


def _scores(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    from .checks._common import encode, forward_logits

    return [forward_logits(model, encode(tokenizer, text, model.device))[0].cpu() for text in texts]


def measure_noise_floor(model: Any, tokenizer: Any, texts: Sequence[str] | None = None) -> NoiseFloor | None:
    """The target's rounding noise in its run dtype, or None when it is float32, cannot be upcast here,
    or is not deterministic (noise that random would hide every bug)."""
    import torch

    from .checks._common import DEFAULT_TEXTS

    texts = DEFAULT_TEXTS if texts is None else texts
    if model.dtype == torch.float32 or not room_for(model, torch.float32)[0]:
        return None
    start = time.perf_counter()
    run = _scores(model, tokenizer, texts)
    if not torch.equal(run[0], _scores(model, tokenizer, texts[:1])[0]):
        return None
    with weights_in(model, torch.float32):
        exact = _scores(model, tokenizer, texts)
    value = max(float((a - b).abs().nan_to_num(nan=float("inf")).max()) for a, b in zip(run, exact, strict=True))
    return NoiseFloor(value, _dtype_name(model.dtype), time.perf_counter() - start)


def calibrated_tolerance(base: Tolerance, noise: NoiseFloor | None) -> Tolerance:
    """``base`` with its absolute part raised to NOISE_FACTOR x the measured noise floor (never lowered)."""
    if noise is None or noise.value == float("inf"):
        return base
    return Tolerance(
        atol=max(base.atol, NOISE_FACTOR * noise.value), rtol=base.rtol, noise=noise.value, noise_source=str(noise)
    )
