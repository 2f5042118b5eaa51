"""Cached vs uncached greedy generation, measured with pytest-benchmark, summarised as a table and a plot.

The KV cache turns generation from O(n^2) (every step re-reads the whole
sequence) into O(n) (every step reads one new token plus the cache). Every
figure here is computed from measurements; nothing is asserted about speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PEAK_BANDWIDTH_GBPS",
    "BenchmarkCollector",
    "Measurement",
    "forced_generate",
    "measure_prefill",
    "peak_bandwidth",
    "random_prompt",
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


def peak_bandwidth(device_name: str) -> float | None:
    """The table's peak bandwidth for a device name (longest matching key wins), or None."""
    matches = [key for key in PEAK_BANDWIDTH_GBPS if key.lower() in device_name.lower()]
    return PEAK_BANDWIDTH_GBPS[max(matches, key=len)] if matches else None


def synchronize(device: Any) -> None:
    """Wait for queued GPU work so a timer measures it (no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def random_prompt(model: Any, tokenizer: Any, length: int, seed: int = 0) -> Any:
    """``(1, length)`` ids drawn from ordinary (non-special) tokens."""
    import torch

    special = set(tokenizer.all_special_ids)
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    pool = torch.tensor([i for i in range(high) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randint(0, len(pool), (1, length), generator=generator)].to(model.device)


def forced_generate(model: Any, tokenizer: Any, input_ids: Any, new_tokens: int, use_cache: bool) -> list[int]:
    """Greedy ``generate`` forced to exactly ``new_tokens`` tokens (eos cannot stop it early)."""
    from .checks.greedy import greedy_generate

    tokens = greedy_generate(
        model, tokenizer, input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache
    )[0]
    synchronize(model.device)
    return tokens


def measure_prefill(model: Any, input_ids: Any, rounds: int) -> float:
    """Median seconds of one forward pass over the prompt: the time to the first token."""
    import torch

    timings = []
    with torch.no_grad():
        model(input_ids=input_ids)  # warm-up
        for _ in range(rounds):
            synchronize(model.device)
            start = time.perf_counter()
            model(input_ids=input_ids)
            synchronize(model.device)
            timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def bytes_per_decode_token(model: Any, context_length: float) -> float:
    """Bytes a cached decode step must read: every weight once, plus the K and V cache of the context."""
    config = model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    cache = 2 * config.num_hidden_layers * heads * head_dim * context_length * element
    return weights + cache


@dataclass
class Measurement:
    """One benchmark: a target, a cache mode and a number of new tokens."""

    target_id: str
    use_cache: bool
    new_tokens: int
    prompt_length: int
    seconds: float
    prefill_seconds: float
    tokens: list[int]
    extra_info: dict[str, Any]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def decode_seconds_per_token(self) -> float:
        return max(self.seconds - self.prefill_seconds, 0.0) / max(self.new_tokens - 1, 1)


@dataclass
class BenchmarkCollector:
    """Measurements of the session, for the speedups, the terminal table and the plot."""

    measurements: dict[tuple[str, bool, int], Measurement] = field(default_factory=dict)

    def add(self, measurement: Measurement) -> None:
        self.measurements[(measurement.target_id, measurement.use_cache, measurement.new_tokens)] = measurement
        pair = [
            self.measurements.get((measurement.target_id, cache, measurement.new_tokens)) for cache in (False, True)
        ]
        if all(pair):
            uncached, cached = pair
            speedup = uncached.seconds / cached.seconds
            for m in pair:
                m.extra_info["speedup_cached_vs_uncached"] = round(speedup, 3)

    def counterpart(self, measurement: Measurement) -> Measurement | None:
        return self.measurements.get((measurement.target_id, not measurement.use_cache, measurement.new_tokens))

    def targets(self) -> list[str]:
        return list(dict.fromkeys(key[0] for key in self.measurements))

    def speedup_summary(self, target_id: str) -> str:
        """``3.77x@128, ...``: cached/uncached speedup per new-token count."""
        parts = []
        for n in sorted({key[2] for key in self.measurements if key[0] == target_id}):
            uncached, cached = (self.measurements.get((target_id, c, n)) for c in (False, True))
            if uncached and cached:
                parts.append(f"{uncached.seconds / cached.seconds:.2f}x@{n}")
        return ", ".join(parts)

    def table(self, target_id: str) -> list[str]:
        """Rows: new tokens, uncached and cached tokens/s, speedup."""
        lines = [f"{'new tokens':>10} {'uncached tok/s':>15} {'cached tok/s':>13} {'speedup':>8}"]
        for n in sorted({key[2] for key in self.measurements if key[0] == target_id}):
            uncached = self.measurements.get((target_id, False, n))
            cached = self.measurements.get((target_id, True, n))
            speedup = f"{uncached.seconds / cached.seconds:7.2f}x" if uncached and cached else "      -"
            lines.append(
                f"{n:>10} {uncached.tokens_per_second if uncached else float('nan'):>15.1f} "
                f"{cached.tokens_per_second if cached else float('nan'):>13.1f} {speedup:>8}"
            )
        return lines

    def plot(self, path: Path) -> Path | None:
        """Time vs new tokens, cached and uncached, one panel per target; None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        targets = self.targets()
        figure, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
        for axis, target_id in zip(axes[0], targets, strict=True):
            for use_cache, style in ((False, "o-"), (True, "s-")):
                points = sorted(
                    (key[2], m.seconds) for key, m in self.measurements.items() if key[:2] == (target_id, use_cache)
                )
                if points:
                    axis.plot(
                        *zip(*points, strict=True), style, label="with KV cache" if use_cache else "without cache"
                    )
            axis.set(title=target_id, xlabel="new tokens", ylabel="generation time (s, median)")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.suptitle("Greedy generation time: O(n^2) without the cache, O(n) with it")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
