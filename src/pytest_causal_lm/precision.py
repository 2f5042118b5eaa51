"""Every dtype judged against the target's own measured rounding noise.

A 36-layer model in bfloat16 carries rounding noise of tenths of a logit, and a
7-8B model in float32 carries more than float32's table tolerance; a fixed
per-dtype tolerance either flags that noise or hides real bugs on small models.
So the scores of a few prompts are computed twice on the same weights: in the
run dtype and in the next wider one (float32 for half precision, float64 for
float32; the weights are upcast, which is exact, and cast back to their own dtypes after).
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
    # a widened weight costs the difference; a narrowed one is kept next to its cast copy (``weights_in``)
    extra = sum(
        p.numel() * (target if _narrowed(p, dtype) else max(target - p.element_size(), 0)) for p in model.parameters()
    )
    free = _bytes_free(model.device)
    cost = f"{extra / 1e9:.2f} GB more while it runs"
    if free is not None and extra * 1.2 > free:
        return False, f"{cost}, {free / 1e9:.2f} GB free on {model.device}"
    return True, cost


def _tensors(model: Any) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """Every parameter and buffer as ``(the module's store, its name, the tensor)``."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            yield from ((store, name, tensor) for name, tensor in store.items() if tensor is not None)


def _narrowed(tensor: Any, dtype: Any) -> bool:
    """Whether casting ``tensor`` to ``dtype`` may lose bits (a float of as many bytes or more, another dtype)."""
    import torch

    width = torch.empty((), dtype=dtype).element_size()
    return tensor.is_floating_point() and tensor.dtype != dtype and tensor.element_size() >= width


@contextmanager
def weights_in(model: Any, dtype: Any) -> Iterator[None]:
    """Cast the weights to ``dtype`` for the block, then give each tensor back its own dtype and values.

    A plain cast back would not: the float32 tensors of a half-precision model (RoPE's ``inv_freq``, modules kept
    in float32) came back in half precision, and a float32 model's values that half precision cannot hold
    (``inv_freq`` again) lost bits, which moved SmolLM2's float32 scores by 0.095 for the rest of the session.
    Tensors the cast narrows are kept and put back; widened ones are cast back to their own dtype, which is exact
    and needs no memory beyond the cast's own.
    """
    kept = [
        (store, name, tensor, tensor.dtype, tensor.data if _narrowed(tensor, dtype) else None)
        for store, name, tensor in _tensors(model)
    ]
    model.to(dtype)
    try:
        yield
    finally:
        for store, name, tensor, original, data in kept:
            # parameters are cast in place, buffers replaced: put back the object, then its values
            tensor.data = data if data is not None else tensor.data.to(original)
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
