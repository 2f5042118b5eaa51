"""Greedy generation timed per mode (no cache, dynamic cache, static cache, static cache + compile), swept over
new tokens and prompt length, measured with pytest-benchmark and summarised as a table, a diagnosis and a plot.

Every step is timed where the user sees it: a streamer records when each new token leaves ``generate``
(the copy to the host synchronises an accelerator), so compiled forwards are timed like eager ones. Every
figure is computed from measurements; nothing is asserted about speed.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import synchronize
from .roofline import Roofline, device_peaks, step_cost
from .settings import BENCHMARK_MODES

__all__ = [
    "BenchmarkCase",
    "BenchmarkCollector",
    "Measurement",
    "TimedGeneration",
    "benchmark_cases",
    "benchmark_generation",
    "fitted_exponent",
    "forced_generate",
    "random_prompt",
    "timed_generate",
]

# Compiling costs tens of seconds, and on CPU buys little: it runs by default on accelerators only.
DEFAULT_MODES = {"cpu": BENCHMARK_MODES[:3], "accelerator": BENCHMARK_MODES}
DEFAULT_PROMPT_LENGTHS = {"cpu": (32, 512), "accelerator": (32, 1024, 8192)}


def random_prompt(model: Any, tokenizer: Any, length: int, seed: int = 0, batch: int = 1) -> Any:
    """``(batch, length)`` ids drawn from ordinary (non-special) tokens."""
    import torch

    special = set(tokenizer.all_special_ids)
    high = min(len(tokenizer), model.config.get_text_config().vocab_size)
    pool = torch.tensor([i for i in range(high) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randint(0, len(pool), (batch, length), generator=generator)].to(model.device)


def generation_options(mode: str | bool) -> tuple[bool, dict[str, Any]]:
    """``(use_cache, GenerationConfig fields)`` of a mode; ``True``/``False`` mean dynamic / no cache."""
    from .checks._generation import static_cache_fields

    if mode is True or mode == "dynamic":
        return True, {}
    if mode is False or mode == "no_cache":
        return False, {}
    if mode in ("static", "static_compiled"):
        return True, static_cache_fields(compile=mode == "static_compiled")
    raise ValueError(f"unknown benchmark mode {mode!r}; choose from {', '.join(BENCHMARK_MODES)}")


def forced_generate(
    model: Any, tokenizer: Any, input_ids: Any, new_tokens: int, mode: str | bool = "dynamic", streamer: Any = None
) -> list[int]:
    """Greedy ``generate`` forced to exactly ``new_tokens`` tokens (eos cannot stop it early); row 0's tokens.

    ``mode``: one of ``BENCHMARK_MODES`` (``True``/``False`` are kept for dynamic / no cache).
    """
    from .checks._generation import greedy_generate

    use_cache, fields = generation_options(mode)
    rows = greedy_generate(
        model,
        tokenizer,
        input_ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=use_cache,
        config_fields=fields,
        **({"streamer": streamer} if streamer is not None else {}),
    )
    synchronize(model.device)
    return rows[0]


class StepClock:
    """A ``generate`` streamer that notes the time each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


@contextmanager
def peak_memory(device: Any) -> Iterator[list[int]]:
    """Yields a one-element list that holds, on exit, the peak bytes: the CUDA allocator's peak, or the
    process's resident set size sampled every 2 ms on CPU (Linux ``/proc``; elsewhere ``ru_maxrss``)."""
    import torch

    peak = [0]
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        peak[0] = torch.cuda.max_memory_allocated(device)
        return
    statm = Path("/proc/self/statm")
    if not statm.exists():
        import resource

        yield peak
        peak[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    done = threading.Event()

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], int(statm.read_text().split()[1]) * page)
            if done.wait(0.002):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


@dataclass
class TimedGeneration:
    """One forced generation: its tokens, total time, time to the first token, each later step, peak memory."""

    tokens: list[int]
    seconds: float
    ttft_seconds: float  # from the call to the first new token
    step_seconds: list[float]  # between consecutive new tokens
    peak_memory_bytes: int = 0


def timed_generate(model: Any, tokenizer: Any, input_ids: Any, new_tokens: int, mode: str | bool) -> TimedGeneration:
    """``forced_generate`` with the arrival of every new token timed."""
    clock = StepClock()
    with peak_memory(model.device) as peak:
        start = time.perf_counter()
        tokens = forced_generate(model, tokenizer, input_ids, new_tokens, mode, streamer=clock)
        seconds = time.perf_counter() - start
    arrivals = clock.arrivals or [start + seconds]
    steps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    return TimedGeneration(tokens, seconds, arrivals[0] - start, steps, peak[0])


def percentile(values: Sequence[float], share: float) -> float:
    """Linear-interpolated percentile (``share`` in 0..1) of ``values``."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fitted_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of log(y) against log(x), least squares: y grows like x**slope over the measured range."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


@dataclass(frozen=True)
class BenchmarkCase:
    """One cell of the sweep."""

    mode: str
    prompt_length: int
    new_tokens: int

    @property
    def id(self) -> str:
        return f"{self.mode}-p{self.prompt_length}-n{self.new_tokens}"


def benchmark_cases(settings: Any, devices: Sequence[str]) -> list[BenchmarkCase]:
    """Every mode over the new-token counts at the first prompt length, then over the other prompt lengths at
    the middle new-token count. Modes and prompt lengths default per device kind (accelerator if any is)."""
    kind = "accelerator" if any(not str(d).startswith("cpu") for d in devices) else "cpu"
    modes = list(dict.fromkeys(settings.benchmark_modes or DEFAULT_MODES[kind]))
    lengths = list(dict.fromkeys(settings.benchmark_prompt_lengths or DEFAULT_PROMPT_LENGTHS[kind]))
    counts = sorted(set(settings.benchmark_new_tokens))
    cases = [BenchmarkCase(mode, lengths[0], n) for n in counts for mode in modes]
    cases += [BenchmarkCase(mode, length, counts[len(counts) // 2]) for length in lengths[1:] for mode in modes]
    return cases


@dataclass
class Measurement:
    """One cell for one target: the timed rounds' medians and percentiles, and what bounds its steps."""

    target_key: str
    case: BenchmarkCase
    batch: int
    rounds: list[TimedGeneration]
    label: str = ""
    roofline: Roofline | None = None
    memory_kind: str = "process RSS"  # or "CUDA allocator"

    @property
    def tokens(self) -> list[int]:
        return self.rounds[-1].tokens

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.rounds)

    @property
    def ttft_seconds(self) -> float:
        return statistics.median(r.ttft_seconds for r in self.rounds)

    @property
    def steps(self) -> list[float]:
        return [s for r in self.rounds for s in r.step_seconds]

    def itl(self, share: float) -> float | None:
        """Inter-token latency percentile over every step of every timed round."""
        return percentile(self.steps, share) if self.steps else None

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.case.new_tokens / self.seconds

    @property
    def peak_memory_bytes(self) -> int:
        return max(r.peak_memory_bytes for r in self.rounds)

    @property
    def spread(self) -> float:
        """Slowest round over fastest: above ``UNSTABLE_SPREAD`` the machine was busy and the median is a guess."""
        totals = [r.seconds for r in self.rounds]
        return max(totals) / min(totals)

    @property
    def unstable(self) -> bool:
        return self.spread > UNSTABLE_SPREAD

    def speedup_over(self, base: Measurement) -> tuple[float, float, float]:
        """``(median, min, max)`` of ``base``'s time over this cell's, round i against round i (both timed the
        same way; the modes' rounds run one cell after another, not interleaved)."""
        ratios = [b.seconds / r.seconds for b, r in zip(base.rounds, self.rounds, strict=False)]
        return statistics.median(ratios), min(ratios), max(ratios)

    def figures(self) -> dict[str, Any]:
        """What goes into pytest-benchmark's extra_info and the reports."""
        totals = [r.seconds for r in self.rounds]
        itl = {f"itl_p{p}_seconds": _rounded(self.itl(p / 100)) for p in (50, 90, 99)}
        return {
            "mode": self.case.mode,
            "prompt_length": self.case.prompt_length,
            "new_tokens": self.case.new_tokens,
            "batch_size": self.batch,
            "rounds": len(self.rounds),
            "median_seconds": _rounded(self.seconds),
            "min_seconds": _rounded(min(totals)),
            "max_seconds": _rounded(max(totals)),
            "ttft_seconds": _rounded(self.ttft_seconds),
            **itl,
            "tokens_per_second": round(self.tokens_per_second, 3),
            "peak_memory_mb": round(self.peak_memory_bytes / 2**20, 1),
            "peak_memory_kind": self.memory_kind,
            "spread": round(self.spread, 3),
            "unstable": self.unstable,
            **(self.roofline.figures() if self.roofline else {}),
        }


# Rounds of one cell whose slowest is more than this many times the fastest: flagged, their figures unreliable.
UNSTABLE_SPREAD = 1.5


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


@dataclass
class BenchmarkCollector:
    """Measurements of the session, for the agreement check, the terminal table, the reports and the plot."""

    measurements: dict[tuple[str, BenchmarkCase], Measurement] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # target key -> display name
    skipped: dict[str, dict[BenchmarkCase, str]] = field(default_factory=dict)  # target key -> cell -> why

    def skip(self, target_key: str, case: BenchmarkCase, reason: str) -> None:
        """Remember a cell that could not run, for the table and the plot."""
        self.skipped.setdefault(target_key, {})[case] = reason

    def baseline_for(self, measurement: Measurement) -> Measurement | None:
        """The no_cache cell of the same target, prompt length and new tokens: what the cache is measured against."""
        case = measurement.case
        if case.mode == "no_cache":
            return None
        return self.measurements.get(
            (measurement.target_key, BenchmarkCase("no_cache", case.prompt_length, case.new_tokens))
        )

    def cell_figures(self, measurement: Measurement) -> dict[str, Any]:
        """A cell's figures plus its speedup over no_cache (median and range of the paired rounds), with
        ``speedup_conclusive`` false when the range straddles 1 or either cell's rounds are unstable."""
        figures = measurement.figures()
        base = self.baseline_for(measurement)
        if base is not None:
            median, low, high = measurement.speedup_over(base)
            steady = not (measurement.unstable or base.unstable)
            figures.update(
                speedup_vs_no_cache=round(median, 3),
                speedup_min=round(low, 3),
                speedup_max=round(high, 3),
                speedup_conclusive=steady and (low > 1 or high < 1),
            )
        return figures

    def add(self, measurement: Measurement) -> None:
        self.labels[measurement.target_key] = measurement.label or measurement.target_key
        self.measurements[(measurement.target_key, measurement.case)] = measurement

    def reference_for(self, measurement: Measurement) -> Measurement | None:
        """The first other mode measured for the same target, prompt length and new tokens."""
        case = measurement.case
        return next(
            (
                m
                for (key, other), m in self.measurements.items()
                if key == measurement.target_key
                and other.mode != case.mode
                and (other.prompt_length, other.new_tokens) == (case.prompt_length, case.new_tokens)
            ),
            None,
        )

    def targets(self) -> list[str]:
        return list(dict.fromkeys(key for key, _ in self.measurements))

    def of(self, target: str) -> list[Measurement]:
        return [m for (key, _), m in self.measurements.items() if key == target]

    def table(self, target: str) -> list[str]:
        """One row per cell: TTFT, inter-token latency percentiles, tokens/s, speedup over no_cache, total time,
        peak memory, MBU, bound; then what was not measured and how to read the totals."""
        lines = [
            f"{'mode':<16}{'prompt':>7}{'new':>5}{'TTFT ms':>9}{'ITL p50':>9}{'p90':>8}{'p99':>8}"
            f"{'tok/s':>9}  {'speedup (min-max)':<20}{'total s (min-max)':<24}{'peak MB':>8}{'MBU':>7}  bound"
        ]
        for m in self.of(target):
            f = self.cell_figures(m)
            ms = [(f[f"itl_p{p}_seconds"] or 0) * 1e3 for p in (50, 90, 99)]
            total = f"{f['median_seconds']:.3g} ({f['min_seconds']:.3g}-{f['max_seconds']:.3g})" + "!" * f["unstable"]
            mbu = f"{f['memory_bandwidth_utilisation']:.1%}" if "memory_bandwidth_utilisation" in f else "-"
            lines.append(
                f"{m.case.mode:<16}{m.case.prompt_length:>7}{m.case.new_tokens:>5}{f['ttft_seconds'] * 1e3:>9.1f}"
                f"{ms[0]:>9.2f}{ms[1]:>8.2f}{ms[2]:>8.2f}{f['tokens_per_second']:>9.1f}  {speedup_text(f):<20}"
                f"{total:<24}{f['peak_memory_mb']:>8.0f}{mbu:>7}  {f.get('bound', '-')}"
            )
        return [*lines, *self.notes(target)]

    def notes(self, target: str) -> list[str]:
        """What was not measured, and how to read the speedup and total columns."""
        skipped = self.skipped.get(target, {}).items()
        missing = [
            f"not measured: {c.mode}, prompt {c.prompt_length}, {c.new_tokens} new tokens: {why}" for c, why in skipped
        ]
        return [*missing, *TABLE_NOTES]

    def diagnoses(self, target: str) -> list[str]:
        """Per mode, the diagnosis of its longest generation at the first prompt length."""
        _, _, by_new_tokens, _ = _sweeps(self.of(target))
        longest: dict[str, Measurement] = {}
        for m in sorted(by_new_tokens, key=lambda m: m.case.new_tokens):
            if m.roofline:
                longest[m.case.mode] = m
        return [f"{mode} ({m.case.new_tokens} new tokens): {m.roofline.diagnosis()}" for mode, m in longest.items()]

    def summary(self, target: str) -> str:
        """``tok/s at N new tokens: no_cache X, dynamic Y (4.3x, 4.1-4.5), ...``: the headline for the verdict."""
        _, _, by_new_tokens, _ = _sweeps(self.of(target))
        most = max(m.case.new_tokens for m in by_new_tokens)
        rates = []
        for m in by_new_tokens:
            if m.case.new_tokens == most:
                f = self.cell_figures(m)
                speedup = f" ({speedup_text(f)})" if "speedup_vs_no_cache" in f else ""
                rates.append(f"{m.case.mode} {m.tokens_per_second:.1f}{speedup}")
        return f"tok/s at {most} new tokens (speedup over no_cache): {', '.join(rates)}"

    def report_cells(self, target: str) -> list[dict[str, Any]]:
        return [self.cell_figures(m) for m in self.of(target)]

    def plot(self, path: Path) -> Path | None:
        """Per target, tokens/s against new tokens and against prompt length, one line per mode, each labelled
        with the fitted growth exponent of its total time; None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        targets = self.targets()
        figure, axes = plt.subplots(len(targets), 2, figsize=(12, 4.5 * len(targets)), squeeze=False)
        for row, target in zip(axes, targets, strict=True):
            cells = self.of(target)
            first_length, middle, by_new_tokens, by_prompt = _sweeps(cells)
            _plot_sweep(row[0], by_new_tokens, lambda m: m.case.new_tokens, "new tokens n", "n")
            _plot_sweep(row[1], by_prompt, lambda m: m.case.prompt_length, "prompt length p (tokens)", "p")
            batch, rounds = cells[0].batch, len(cells[0].rounds)
            label = self.labels[target]
            row[0].set_title(
                f"{label}\nprompt {first_length} tokens, batch {batch}, median of {rounds} rounds", fontsize=10
            )
            row[1].set_title(f"{label}\n{middle} new tokens, batch {batch}, median of {rounds} rounds", fontsize=10)
            missing = [c.prompt_length for c in self.skipped.get(target, {}) if c.new_tokens == middle]
            if missing:
                lengths = ", ".join(map(str, sorted(set(missing))))
                row[1].annotate(
                    f"not measured (past the model's context): p = {lengths}",
                    (0.02, 0.02),
                    xycoords="axes fraction",
                    fontsize=8,
                )
        figure.suptitle("Forced greedy generation: tokens/s; legends: growth of total time, fitted to the points")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


TABLE_NOTES = (
    "speedup = no_cache's time / this mode's, round i against round i: median (min-max); '?' = inconclusive "
    "(the range straddles 1, or either cell's rounds are unstable)",
    f"total = generate() alone, median of the timed rounds; '!' = unstable: slowest round > {UNSTABLE_SPREAD}x the "
    "fastest (a busy machine). pytest-benchmark's table times each whole round: generate plus the streamer and "
    "memory sampler around it, so its figures run a little higher",
)


def speedup_text(figures: dict[str, Any]) -> str:
    """``4.3x (4.1-4.5)``, with ``?`` when inconclusive; ``-`` without a no_cache cell."""
    if "speedup_vs_no_cache" not in figures:
        return "-"
    mark = "" if figures["speedup_conclusive"] else "?"
    return f"{figures['speedup_vs_no_cache']:.2f}x{mark} ({figures['speedup_min']:.2f}-{figures['speedup_max']:.2f})"


def _sweeps(cells: list[Measurement]) -> tuple[int, int, list[Measurement], list[Measurement]]:
    """``(first prompt length, new tokens of the prompt sweep, the new-token sweep, the prompt-length sweep)``."""
    first_length = min(m.case.prompt_length for m in cells)
    by_new_tokens = [m for m in cells if m.case.prompt_length == first_length]
    counts = sorted({m.case.new_tokens for m in by_new_tokens})
    middle = counts[len(counts) // 2]  # the prompt-length sweep's count, as benchmark_cases chose it
    return first_length, middle, by_new_tokens, [m for m in cells if m.case.new_tokens == middle]


def _plot_sweep(axis: Any, cells: list[Measurement], x_of: Any, xlabel: str, symbol: str) -> None:
    """tokens/s against ``x_of`` per mode, each labelled with how its total time grew with ``symbol``."""
    axis.set(xlabel=xlabel, ylabel="tokens/s", xscale="log")
    measured: set[int] = set()
    for mode in BENCHMARK_MODES:
        points = sorted((x_of(m), m.tokens_per_second, m.seconds) for m in cells if m.case.mode == mode)
        if not points:
            continue
        xs, rates, seconds = zip(*points, strict=True)
        exponent = fitted_exponent(xs, seconds)
        growth = f" (time ~ {symbol}^{exponent:.2f})" if exponent is not None else ""
        axis.plot(xs, rates, "o-", label=f"{mode}{growth}")
        measured.update(xs)
    axis.set_xticks(sorted(measured), [str(x) for x in sorted(measured)])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def benchmark_generation(
    causal_lm: Any, benchmark: Any, collector: BenchmarkCollector, settings: Any, case: BenchmarkCase
) -> Measurement | None:
    """Time forced greedy generation of one ``case`` with pytest-benchmark's ``benchmark`` fixture.

    Warm-up rounds first (one more for a compiled mode, whose first calls compile), then
    ``settings.benchmark_rounds`` timed ones; the figures go to ``benchmark.extra_info`` and ``collector``.
    Its tokens must agree with the first other mode measured for the same cell (near-tie aware).
    Returns None under --benchmark-disable (nothing measured).
    """
    __tracebackhide__ = True
    import pytest

    model, tokenizer = causal_lm.model, causal_lm.tokenizer
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and case.prompt_length + case.new_tokens > limit:
        reason = f"prompt {case.prompt_length} + {case.new_tokens} new tokens exceed max_position_embeddings {limit}"
        collector.skip(causal_lm.target.key, case, reason)
        pytest.skip(reason)
    benchmark.group = f"{causal_lm.target.id} prompt={case.prompt_length} new_tokens={case.new_tokens}"
    batch = settings.benchmark_batch_size
    prompt = random_prompt(model, tokenizer, case.prompt_length, seed=causal_lm.seed, batch=batch)
    rounds: list[TimedGeneration] = []
    warmup = settings.benchmark_warmup_rounds + (case.mode == "static_compiled")
    benchmark.pedantic(
        lambda: rounds.append(timed_generate(model, tokenizer, prompt, case.new_tokens, case.mode)),
        rounds=settings.benchmark_rounds,
        warmup_rounds=warmup,
        iterations=1,
    )
    if benchmark.stats is None:
        return None
    memory = "CUDA allocator" if causal_lm.device.startswith("cuda") else "process RSS"
    measurement = Measurement(
        causal_lm.target.key, case, batch, rounds[warmup:], causal_lm.target.id, memory_kind=memory
    )
    itl = measurement.itl(0.5)
    if itl:
        peaks = device_peaks(model.device, model.dtype, settings.peak_bandwidth)
        context = case.prompt_length + case.new_tokens / 2
        cost = step_cost(model, context=context, batch=batch, cached=case.mode != "no_cache")
        measurement.roofline = Roofline(itl, cost, peaks)
    collector.add(measurement)
    benchmark.extra_info.update(  # the speedup when no_cache was measured before this cell (the default order)
        checkpoint=causal_lm.checkpoint,
        device=causal_lm.device,
        dtype=causal_lm.dtype,
        **collector.cell_figures(measurement),
    )
    _assert_modes_agree(causal_lm, collector, measurement, prompt)
    return measurement


def _assert_modes_agree(causal_lm: Any, collector: BenchmarkCollector, measurement: Measurement, prompt: Any) -> None:
    __tracebackhide__ = True
    from .checks._generation import assert_same_continuation

    other = collector.reference_for(measurement)
    if other is None:
        return
    assert_same_continuation(
        causal_lm.model,
        causal_lm.tokenizer,
        prompt[:1],
        other.tokens,
        measurement.tokens,
        labels=(other.case.mode, measurement.case.mode),
        tolerance=causal_lm.tolerance,
        title=f"{other.case.mode} and {measurement.case.mode} generation disagree "
        f"(prompt {measurement.case.prompt_length}, {measurement.case.new_tokens} new tokens)",
    )
