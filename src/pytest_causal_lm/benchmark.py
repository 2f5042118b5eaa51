"""Cached vs uncached greedy generation, measured with pytest-benchmark, summarised as a table and a plot.

Without the cache every step re-reads the whole sequence; with it, every step
reads one new token plus the cache. Every figure here is computed from
measurements; nothing is asserted about speed.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PEAK_BANDWIDTH_GBPS",
    "BenchmarkCollector",
    "Measurement",
    "TimedGeneration",
    "bandwidth_figures",
    "benchmark_generation",
    "forced_generate",
    "peak_bandwidth",
    "random_prompt",
    "timed_generate",
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


@dataclass
class TimedGeneration:
    """One forced generation, timed forward by forward: the prefill, then every decoding step."""

    tokens: list[int]
    seconds: float
    prefill_seconds: float  # from the call to the end of the first forward: the time to the first token
    step_seconds: list[float]  # each later forward, end to end

    @property
    def decode_seconds_per_token(self) -> float | None:
        """Mean time of a decoding step: measured steps only, so never zero or negative; None for one new token."""
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None


def timed_generate(model: Any, tokenizer: Any, input_ids: Any, new_tokens: int, use_cache: bool) -> TimedGeneration:
    """``forced_generate`` with the end of every forward pass timed (synchronised on CUDA)."""
    ends: list[float] = []

    def mark(*_: Any) -> None:
        synchronize(model.device)
        ends.append(time.perf_counter())

    handle = model.register_forward_hook(mark)
    try:
        start = time.perf_counter()
        tokens = forced_generate(model, tokenizer, input_ids, new_tokens, use_cache)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    steps = [later - earlier for earlier, later in itertools.pairwise(ends)]
    return TimedGeneration(tokens, seconds, ends[0] - start if ends else seconds, steps)


def bytes_per_decode_token(model: Any, context_length: float) -> float:
    """Bytes a cached decode step must read: every weight once, plus the K and V cache of the context."""
    config = model.config.get_text_config()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    cache = 2 * config.num_hidden_layers * heads * head_dim * context_length * element
    return weights + cache


def bandwidth_figures(model: Any, measurement: Measurement, peak_gbps: float | None = None) -> dict[str, float | str]:
    """Achieved memory bandwidth of cached decoding on CUDA, and its fraction of the device's peak."""
    import torch

    if not measurement.use_cache or model.device.type != "cuda" or not measurement.decode_seconds_per_token:
        return {}
    moved = bytes_per_decode_token(model, measurement.prompt_length + measurement.new_tokens / 2)
    achieved = moved / measurement.decode_seconds_per_token / 1e9
    name = torch.cuda.get_device_name(model.device)
    figures: dict[str, float | str] = {"device_name": name, "achieved_bandwidth_gbps": round(achieved, 1)}
    peak = peak_gbps or peak_bandwidth(name)
    if peak:
        figures.update(peak_bandwidth_gbps=peak, bandwidth_fraction=round(achieved / peak, 3))
    return figures


@dataclass
class Measurement:
    """One benchmark: a target (by key), a cache mode and a number of new tokens."""

    target_key: str
    use_cache: bool
    new_tokens: int
    prompt_length: int
    seconds: float
    prefill_seconds: float
    tokens: list[int]
    extra_info: dict[str, Any]
    decode_seconds_per_token: float | None = None
    label: str = ""

    @classmethod
    def from_rounds(
        cls, target: Any, use_cache: bool, rounds: list[TimedGeneration], prompt_length: int, extra_info: dict[str, Any]
    ) -> Measurement:
        """The median of the timed rounds, figure by figure."""
        decode = [r.decode_seconds_per_token for r in rounds if r.decode_seconds_per_token is not None]
        return cls(
            target_key=target.key,
            label=target.id,
            use_cache=use_cache,
            new_tokens=len(rounds[-1].tokens),
            prompt_length=prompt_length,
            seconds=_median([r.seconds for r in rounds]),
            prefill_seconds=_median([r.prefill_seconds for r in rounds]),
            tokens=rounds[-1].tokens,
            extra_info=extra_info,
            decode_seconds_per_token=_median(decode) if decode else None,
        )

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    def figures(self) -> dict[str, Any]:
        """What goes into pytest-benchmark's extra_info."""
        decode = self.decode_seconds_per_token
        return {
            "mode": "cached" if self.use_cache else "uncached",
            "new_tokens": self.new_tokens,
            "prompt_length": self.prompt_length,
            "median_seconds": round(self.seconds, 6),
            "prefill_seconds": round(self.prefill_seconds, 6),
            "decode_seconds_per_token": None if decode is None else float(f"{decode:.6g}"),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass
class BenchmarkCollector:
    """Measurements of the session, for the speedups, the terminal table and the plot."""

    measurements: dict[tuple[str, bool, int], Measurement] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # target key -> display name

    def add(self, measurement: Measurement) -> None:
        self.labels[measurement.target_key] = measurement.label or measurement.target_key
        self.measurements[(measurement.target_key, measurement.use_cache, measurement.new_tokens)] = measurement
        pair = [
            self.measurements.get((measurement.target_key, cache, measurement.new_tokens)) for cache in (False, True)
        ]
        if all(pair):
            uncached, cached = pair
            speedup = uncached.seconds / cached.seconds
            for m in pair:
                m.extra_info["speedup_cached_vs_uncached"] = round(speedup, 3)

    def counterpart(self, measurement: Measurement) -> Measurement | None:
        return self.measurements.get((measurement.target_key, not measurement.use_cache, measurement.new_tokens))

    def targets(self) -> list[str]:
        return list(dict.fromkeys(key[0] for key in self.measurements))

    def sizes(self, target: str) -> list[int]:
        """The new-token counts measured for ``target`` (a target key)."""
        return sorted({n for key, _, n in self.measurements if key == target})

    def speedup_summary(self, target: str) -> str:
        """``3.77x@128, ...``: cached/uncached speedup per new-token count."""
        parts = []
        for n in self.sizes(target):
            uncached, cached = (self.measurements.get((target, c, n)) for c in (False, True))
            if uncached and cached:
                parts.append(f"{uncached.seconds / cached.seconds:.2f}x@{n}")
        return ", ".join(parts)

    def table(self, target: str) -> list[str]:
        """Rows: new tokens, uncached and cached tokens/s, speedup."""
        lines = [f"{'new tokens':>10} {'uncached tok/s':>15} {'cached tok/s':>13} {'speedup':>8}"]
        for n in self.sizes(target):
            uncached = self.measurements.get((target, False, n))
            cached = self.measurements.get((target, True, n))
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
        for axis, target in zip(axes[0], targets, strict=True):
            for use_cache, style in ((False, "o-"), (True, "s-")):
                points = [
                    (n, m.seconds) for n in self.sizes(target) if (m := self.measurements.get((target, use_cache, n)))
                ]
                if points:
                    axis.plot(
                        *zip(*points, strict=True), style, label="with KV cache" if use_cache else "without cache"
                    )
            axis.set(title=self.labels[target], xlabel="new tokens", ylabel="generation time (s, median)")
            axis.grid(alpha=0.3)
            axis.legend()
        figure.suptitle("Forced greedy generation: median wall time per call vs new tokens")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def benchmark_generation(
    causal_lm: Any, benchmark: Any, collector: BenchmarkCollector, settings: Any, *, use_cache: bool, new_tokens: int
) -> Measurement | None:
    """Time forced greedy generation of ``new_tokens`` with pytest-benchmark's ``benchmark`` fixture.

    One warm-up round, then ``settings.benchmark_rounds`` timed ones; the figures go to
    ``benchmark.extra_info`` and ``collector``. Once both cache modes of a size are in, their
    tokens must agree (near-tie aware). Returns None under --benchmark-disable (nothing measured).
    """
    __tracebackhide__ = True
    from .checks.greedy import assert_same_continuation

    model, tokenizer = causal_lm.model, causal_lm.tokenizer
    benchmark.group = f"{causal_lm.target.id} new_tokens={new_tokens}"
    prompt = random_prompt(model, tokenizer, settings.benchmark_prompt_length, seed=causal_lm.seed)
    rounds: list[TimedGeneration] = []
    benchmark.pedantic(
        lambda: rounds.append(timed_generate(model, tokenizer, prompt, new_tokens, use_cache)),
        rounds=settings.benchmark_rounds,
        warmup_rounds=1,
        iterations=1,
    )
    if benchmark.stats is None:
        return None
    timed = rounds[-settings.benchmark_rounds :]  # the warm-up round is not a measurement
    measurement = Measurement.from_rounds(causal_lm.target, use_cache, timed, prompt.shape[1], benchmark.extra_info)
    benchmark.extra_info.update(
        checkpoint=causal_lm.checkpoint,
        device=causal_lm.device,
        dtype=causal_lm.dtype,
        **measurement.figures(),
        **bandwidth_figures(model, measurement, settings.peak_bandwidth),
    )
    collector.add(measurement)
    other = collector.counterpart(measurement)
    if other is not None:
        uncached, cached = (other, measurement) if use_cache else (measurement, other)
        assert_same_continuation(
            model,
            tokenizer,
            prompt,
            uncached.tokens,
            cached.tokens,
            labels=("without cache", "with KV cache"),
            tolerance=causal_lm.tolerance,
            title=f"cached and uncached generation disagree ({new_tokens} new tokens)",
        )
    return measurement
