"""What bounds a decoding step: the bytes it must read and the arithmetic it must do, against the device's peaks.

A step cannot be faster than reading every weight (and, with a cache, the cached keys and values) at the
device's peak bandwidth, nor than its arithmetic at the peak FLOP rate. When a measured step is far slower
than both floors, per-step overhead (kernel launches, Python, synchronisation) bounds it: that is what eager
decoding of a small model at batch 1 looks like, and what a static cache with ``torch.compile`` attacks.
Peaks come from a table (GPU bandwidth), an option, or a short measurement (a large copy, a large matmul).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .devices import synchronize

__all__ = [
    "PEAK_BANDWIDTH_GBPS",
    "DevicePeaks",
    "Roofline",
    "StepCost",
    "device_peaks",
    "peak_bandwidth",
    "step_cost",
]

# Peak memory bandwidth (GB/s) of common GPUs, matched against torch.cuda.get_device_name().
PEAK_BANDWIDTH_GBPS: dict[str, float] = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "GH200": 4000.0,
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L40": 864.0,
    "L4": 300.0,
    "A10G": 600.0,
    "A10": 600.0,
    "T4": 320.0,
    "V100": 900.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
}

# A step is bound by a resource when its floor takes at least this share of the measured step.
BOUND_SHARE = 0.5


def peak_bandwidth(device_name: str) -> float | None:
    """The table's peak bandwidth for a device name (longest matching key wins), or None."""
    matches = [key for key in PEAK_BANDWIDTH_GBPS if key.lower() in device_name.lower()]
    return PEAK_BANDWIDTH_GBPS[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class DevicePeaks:
    """Peak memory bandwidth (bytes/s) and arithmetic rate (FLOP/s) of a device in a dtype, and their sources."""

    bandwidth: float
    flops: float
    bandwidth_source: str
    flops_source: str


def _best_seconds(run: Any, device: Any, repeats: int = 5) -> float:
    run()  # warm-up: allocation, first-call dispatch
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


_MEASURED: dict[tuple[str, str], tuple[float, float]] = {}


def _measured_peaks(device: Any, dtype: Any) -> tuple[float, float]:
    """``(copy bandwidth, matmul FLOP/s)`` measured once per device and dtype: the best of 5 runs of a
    256 MiB copy (read + write) and of a 2048-square matmul."""
    import torch

    key = (str(device), str(dtype))
    if key not in _MEASURED:
        source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
        target = torch.empty_like(source)
        bandwidth = 2 * source.numel() * 4 / _best_seconds(lambda: target.copy_(source), device)
        a = torch.randn(2048, 2048, device=device).to(dtype)
        b = torch.randn(2048, 2048, device=device).to(dtype)
        flops = 2 * 2048**3 / _best_seconds(lambda: a @ b, device)
        _MEASURED[key] = (bandwidth, flops)
    return _MEASURED[key]


def device_peaks(device: Any, dtype: Any, configured_gbps: float | None = None) -> DevicePeaks:
    """The peaks a step is judged against: bandwidth from the option, else the GPU table, else measured."""
    import torch

    copy_bandwidth, flops = _measured_peaks(device, dtype)
    if configured_gbps:
        return DevicePeaks(configured_gbps * 1e9, flops, "--causal-lm-peak-bandwidth", "measured matmul")
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else ""
    table = peak_bandwidth(name) if name else None
    if table:
        return DevicePeaks(table * 1e9, flops, f"table ({name})", "measured matmul")
    return DevicePeaks(copy_bandwidth, flops, "measured copy", "measured matmul")


@dataclass(frozen=True)
class StepCost:
    """What one decoding step must read and compute."""

    bytes: float
    flops: float


def step_cost(model: Any, *, context: float, batch: int, cached: bool) -> StepCost:
    """Bytes and FLOPs of one step at ``context`` tokens: with a cache, one new token per row reads every
    weight and the cached keys and values; without, the whole sequence is recomputed (weights read once)."""
    config = model.config.get_text_config()
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    query_width = config.num_attention_heads * head_dim
    if cached:
        cache_bytes = 2 * layers * heads * head_dim * context * element * batch
        attention = 4 * layers * query_width * context * batch  # scores and weighted sum, one query per row
        return StepCost(weight_bytes + cache_bytes, 2 * parameters * batch + attention)
    attention = 2 * layers * query_width * context * context * batch  # causal: half of the square, twice
    return StepCost(weight_bytes, 2 * parameters * batch * context + attention)


@dataclass(frozen=True)
class Roofline:
    """A measured step against its floors: achieved rates, their shares of the peaks, and the verdict."""

    step_seconds: float
    cost: StepCost
    peaks: DevicePeaks

    @property
    def achieved_bandwidth(self) -> float:
        return self.cost.bytes / self.step_seconds

    @property
    def bandwidth_utilisation(self) -> float:
        return self.achieved_bandwidth / self.peaks.bandwidth

    @property
    def compute_utilisation(self) -> float:
        return self.cost.flops / self.step_seconds / self.peaks.flops

    def bound(self) -> str:
        """``memory bandwidth``, ``compute`` or ``per-step overhead``: the larger floor, when it fills at least
        half the step; otherwise neither explains the step's time."""
        share, name = max((self.bandwidth_utilisation, "memory bandwidth"), (self.compute_utilisation, "compute"))
        return name if share >= BOUND_SHARE else "per-step overhead"

    def diagnosis(self) -> str:
        """One line, from the numbers alone."""
        floor_memory = self.cost.bytes / self.peaks.bandwidth * 1e3
        floor_compute = self.cost.flops / self.peaks.flops * 1e3
        return (
            f"decode bound by {self.bound()}: a step takes {self.step_seconds * 1e3:.3g} ms; reading "
            f"{self.cost.bytes / 1e6:.4g} MB at the peak {self.peaks.bandwidth / 1e9:.4g} GB/s "
            f"({self.peaks.bandwidth_source}) takes {floor_memory:.3g} ms (MBU {self.bandwidth_utilisation:.1%}), "
            f"{self.cost.flops / 1e9:.3g} GFLOP at {self.peaks.flops / 1e12:.3g} TFLOP/s ({self.peaks.flops_source}) "
            f"{floor_compute:.3g} ms ({self.compute_utilisation:.1%})"
        )

    def figures(self) -> dict[str, Any]:
        return {
            "bytes_per_step": round(self.cost.bytes),
            "flops_per_step": round(self.cost.flops),
            "achieved_bandwidth_gbps": round(self.achieved_bandwidth / 1e9, 3),
            "peak_bandwidth_gbps": round(self.peaks.bandwidth / 1e9, 3),
            "peak_bandwidth_source": self.peaks.bandwidth_source,
            "memory_bandwidth_utilisation": round(self.bandwidth_utilisation, 4),
            "peak_tflops": round(self.peaks.flops / 1e12, 4),
            "compute_utilisation": round(self.compute_utilisation, 4),
            "bound": self.bound(),
            "diagnosis": self.diagnosis(),
        }
