"""The opt-in generation benchmark: modes, sweeps, figures that agree with each other, reports and plot.

Nothing here asserts a speed: only that the figures are measured, consistent and land where users read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import broken
import pytest

from pytest_causal_lm.benchmark import (
    BenchmarkCase,
    BenchmarkCollector,
    Measurement,
    benchmark_cases,
    fitted_exponent,
    percentile,
    timed_generate,
)
from pytest_causal_lm.roofline import DevicePeaks, Roofline, device_peaks, peak_bandwidth, step_cost

SMALL = (
    "--causal-lm-checkpoint=tiny:qwen3",
    "--causal-lm-benchmark-new-tokens=2,6",
    "--causal-lm-benchmark-prompt-lengths=8",
    "--causal-lm-benchmark-rounds=2",
    "-k",
    "generation_speed",
)
CPU_MODES = ("no_cache", "dynamic", "static")


def test_ordinary_runs_do_not_collect_the_benchmarks_and_xdist_cannot_time_them(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SMALL, "--co")
    assert "generation_speed" not in result.stdout.str()
    result = pytester.runpytest(*SMALL, "--co", "--causal-lm-benchmark")
    assert result.stdout.str().count("test_generation_speed[") == 6  # 3 CPU modes x 2 new-token counts
    for asked in ("--causal-lm-benchmark", "--benchmark-only"):  # pytest-benchmark's own words never come first
        result = pytester.runpytest(*SMALL, asked, "-n", "2")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["ERROR: the generation benchmark (*) under pytest-xdist (-n): *nothing would be measured*"]
        )


def test_the_sweep_covers_every_mode_over_new_tokens_then_prompt_lengths() -> None:
    settings = SimpleNamespace(
        benchmark_modes=(), benchmark_prompt_lengths=(), benchmark_new_tokens=(32, 8, 128), benchmark_batch_size=1
    )
    cpu = benchmark_cases(settings, ["cpu"])
    assert [c.id for c in cpu[:3]] == ["no_cache-p32-n8", "dynamic-p32-n8", "static-p32-n8"]
    assert {c.mode for c in cpu} == set(CPU_MODES) and len(cpu) == 12
    assert [c.id for c in cpu[-3:]] == ["no_cache-p512-n32", "dynamic-p512-n32", "static-p512-n32"]
    gpu = benchmark_cases(settings, ["cuda:0"])
    assert {c.mode for c in gpu} == {*CPU_MODES, "static_compiled"}
    assert sorted({c.prompt_length for c in gpu}) == [32, 1024, 8192]


def test_benchmark_writes_every_figure_a_table_a_diagnosis_and_a_png(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *SMALL, "--causal-lm-benchmark", "--benchmark-json=bench.json", "--causal-lm-benchmark-plot=plots/speed.png"
    )
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        [
            "*causal-lm benchmark: forced greedy generation*",
            "tiny-qwen3-cpu-float32",
            "*mode*prompt*new*TTFT ms*ITL p50*p90*p99*tok/s*total s (min-max)*peak MB*MBU*bound",
            "*no_cache * 8 * 6 *",
            "*static (6 new tokens): decode bound by *: a step takes * ms; reading * MB at the peak * GB/s*",
            f"plot of tokens/s vs new tokens and vs prompt length: {pytester.path / 'plots' / 'speed.png'}",
        ]
    )
    png = (pytester.path / "plots" / "speed.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    benchmarks = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    assert sorted(b["extra_info"]["mode"] for b in benchmarks) == sorted(CPU_MODES * 2)
    for entry in benchmarks:
        info = entry["extra_info"]
        assert info["prompt_length"] == 8 and info["new_tokens"] in (2, 6) and info["rounds"] == 2
        for figure in ("median_seconds", "ttft_seconds", "itl_p50_seconds", "itl_p99_seconds", "tokens_per_second"):
            assert info[figure] > 0, figure
        # generate() alone is timed inside pytest-benchmark's round, so each of its figures is at most the round's
        for ours, theirs in (("min_seconds", "min"), ("median_seconds", "median"), ("max_seconds", "max")):
            assert info[ours] <= entry["stats"][theirs] * (1 + 1e-3), (ours, info[ours], entry["stats"][theirs])
        assert info["peak_memory_mb"] > 0 and info["peak_memory_kind"] == "process RSS"
        assert info["bound"] in ("per-step overhead", "memory bandwidth", "compute")
        assert entry["group"] == f"tiny-qwen3-cpu-float32 prompt=8 new_tokens={info['new_tokens']}"
        assert entry["stats"]["rounds"] == 2
    cells = {(b["extra_info"]["mode"], b["extra_info"]["new_tokens"]): b["extra_info"] for b in benchmarks}
    for (mode, new), info in cells.items():
        if mode == "no_cache":
            continue
        # the paired ratios no_cache round / this round lie between the extreme pairings of the two cells' rounds
        base = cells[("no_cache", new)]
        low, high = base["min_seconds"] / info["max_seconds"], base["max_seconds"] / info["min_seconds"]
        assert (
            low - 1e-3 <= info["speedup_min"] <= info["speedup_vs_no_cache"] <= info["speedup_max"] <= high + 1e-3
        )  # rounded to 3 decimals


def test_the_reports_carry_the_benchmark(pytester: pytest.Pytester) -> None:
    args = [*SMALL[:-1], "generation_speed or determinism", "--causal-lm-benchmark"]
    pytester.runpytest(*args, "--causal-lm-report=report.md").assert_outcomes(passed=7)
    markdown = (pytester.path / "report.md").read_text()
    assert "### Generation benchmark: `tiny-qwen3-cpu-float32`" in markdown
    assert (
        "| mode | prompt | new | TTFT ms | ITL p50 ms |" in markdown
        and "- static (6 new tokens): decode bound" in markdown
    )
    pytester.runpytest(*args, "--causal-lm-report=report.json").assert_outcomes(passed=7)
    target = json.loads((pytester.path / "report.json").read_text())["targets"]
    (bench,) = [t["benchmark"] for t in target.values()]
    assert bench["summary"].startswith("tok/s at 6 new tokens (speedup over no_cache): no_cache ")
    assert len(bench["cells"]) == 6 and all("itl_p90_seconds" in cell for cell in bench["cells"])


def test_benchmark_skip_and_only_behave_as_pytest_benchmark_users_expect(pytester: pytest.Pytester) -> None:
    skipped = pytester.runpytest(*SMALL, "--causal-lm-benchmark", "--benchmark-skip")
    skipped.assert_outcomes(skipped=6)
    only = pytester.runpytest(
        *SMALL[:-2],
        "--causal-lm-benchmark-modes=dynamic",
        "--benchmark-only",
        "-m",
        "causal_lm_benchmark or causal_lm_determinism",
    )
    only.assert_outcomes(passed=2, skipped=1)  # the invariant test is not a benchmark


def test_a_prompt_longer_than_the_model_allows_skips_its_cell(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *SMALL[:3],
        "--causal-lm-benchmark-prompt-lengths=8,600",
        "--causal-lm-benchmark-modes=dynamic",
        "--causal-lm-benchmark-rounds=1",
        "--causal-lm-benchmark",
        "-k",
        "generation_speed",
        "-rs",
    )
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*prompt 600 + 6 new tokens exceed max_position_embeddings 512*"])


BROKEN_CACHE_CONFTEST = """
import pytest


@pytest.fixture(scope="session")
def causal_lm(causal_lm):
    # a cache update that loses the newest key/value of layer 1: cached generation goes astray
    def drop(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if cache is not None and cache.layers[1].keys is not None and cache.layers[1].keys.shape[2] > 1:
            cache.layers[1].keys = cache.layers[1].keys[:, :, :-1]
            cache.layers[1].values = cache.layers[1].values[:, :, :-1]
        return output

    causal_lm.model.register_forward_hook(drop, with_kwargs=True)
    return causal_lm
"""


def test_benchmark_fails_when_modes_disagree_on_the_tokens(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BROKEN_CACHE_CONFTEST)
    result = pytester.runpytest(*SMALL, "--causal-lm-benchmark", "--causal-lm-benchmark-modes=no_cache,dynamic")
    # with 2 new tokens the damaged cache is read once and happens to pick the same token; with 6 it diverges
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        ["E * no_cache and dynamic generation disagree (prompt 8, 6 new tokens) at step * with a clear score margin*"]
    )


def test_static_compiled_mode_agrees_with_dynamic(pytester: pytest.Pytester) -> None:
    # in a subprocess: torch.compile registers global state on import, which in-process runs would import twice
    result = pytester.runpytest_subprocess(
        *SMALL[:1],
        "--causal-lm-benchmark-new-tokens=6",
        "--causal-lm-benchmark-prompt-lengths=8",
        "--causal-lm-benchmark-rounds=1",
        "--causal-lm-benchmark-modes=dynamic,static_compiled",
        "--causal-lm-benchmark",
        "-k",
        "generation_speed",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*static_compiled * 8 * 6 *"])


@pytest.mark.parametrize("mode", ["no_cache", "dynamic", "static"])
def test_the_figures_of_a_real_measurement_are_consistent_with_each_other(qwen3_path: Path, mode: str) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    prompt = tokenizer("Hi dog how are you?", return_tensors="pt")["input_ids"]
    rounds = [timed_generate(model, tokenizer, prompt, 12, mode) for _ in range(3)]
    case = BenchmarkCase(mode, prompt.shape[1], 12)
    measurement = Measurement("t", case, 1, rounds)
    for timed in rounds:
        assert len(timed.tokens) == 12 and len(timed.step_seconds) == 11
        arrival_of_last = timed.ttft_seconds + sum(timed.step_seconds)  # latencies add up to the last token
        assert 0 < arrival_of_last <= timed.seconds
        assert timed.seconds - arrival_of_last < 0.5 * timed.seconds  # what follows the last token is small
    figures = measurement.figures()
    assert math.isclose(figures["tokens_per_second"], 12 / measurement.seconds, rel_tol=1e-3)
    steps = sorted(s for r in rounds for s in r.step_seconds)
    assert steps[0] <= figures["itl_p50_seconds"] <= figures["itl_p90_seconds"] <= figures["itl_p99_seconds"]
    assert figures["itl_p99_seconds"] <= steps[-1]
    peaks = device_peaks(model.device, model.dtype)
    cost = step_cost(model, context=case.prompt_length + 6, batch=1, cached=mode != "no_cache")
    roofline = Roofline(figures["itl_p50_seconds"], cost, peaks)
    assert math.isclose(roofline.achieved_bandwidth, cost.bytes / figures["itl_p50_seconds"])
    assert math.isclose(roofline.bandwidth_utilisation, roofline.achieved_bandwidth / peaks.bandwidth)


def test_step_cost_and_the_bound_follow_from_the_numbers(qwen3_path: Path) -> None:
    model, _ = broken.load_healthy(qwen3_path)
    weights = sum(p.numel() * 4 for p in model.parameters())
    cached = step_cost(model, context=100, batch=1, cached=True)
    # Qwen3 tiny: 2 layers x 2 kv heads x head_dim 8, keys and values, float32
    assert cached.bytes == weights + 2 * 2 * 2 * 8 * 100 * 4
    assert step_cost(model, context=100, batch=1, cached=False).flops > 50 * cached.flops  # recomputes 100 tokens
    peaks = DevicePeaks(bandwidth=1e9, flops=1e12, bandwidth_source="test", flops_source="test")
    memory_bound = Roofline(step_seconds=cached.bytes / 1e9 / 0.8, cost=cached, peaks=peaks)  # 80% of the peak
    assert memory_bound.bound() == "memory bandwidth" and "MBU 80.0%" in memory_bound.diagnosis()
    overhead_bound = Roofline(step_seconds=100 * cached.bytes / 1e9, cost=cached, peaks=peaks)
    assert overhead_bound.bound() == "per-step overhead"


def test_fitted_exponents_percentiles_and_the_bandwidth_table() -> None:
    assert fitted_exponent([8, 32, 128], [0.1 * n**2 for n in (8, 32, 128)]) == pytest.approx(2.0)
    assert fitted_exponent([8, 32, 128], [3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert fitted_exponent([32], [1.0]) is None  # one point shows no growth
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth("Intel Xeon") is None


def test_the_collector_summarises_the_longest_run_per_mode() -> None:
    collector = BenchmarkCollector()
    for mode, seconds in (("no_cache", 4.0), ("dynamic", 1.0)):
        for n in (8, 32):
            rounds = [
                SimpleNamespace(seconds=seconds * n / 8, ttft_seconds=0.1, step_seconds=[0.01], peak_memory_bytes=1)
            ]
            collector.add(Measurement("t", BenchmarkCase(mode, 16, n), 1, rounds))  # type: ignore[arg-type]
    assert collector.summary("t") == (
        "tok/s at 32 new tokens (speedup over no_cache): no_cache 2.0, dynamic 8.0 (4.00x (4.00-4.00))"
    )
    dynamic = collector.measurements[("t", BenchmarkCase("dynamic", 16, 32))]
    assert collector.reference_for(dynamic).case.mode == "no_cache"


def _cell(mode: str, seconds: list[float]) -> Measurement:
    rounds = [SimpleNamespace(seconds=t, ttft_seconds=0.1, step_seconds=[t / 8], peak_memory_bytes=1) for t in seconds]
    return Measurement("t", BenchmarkCase(mode, 16, 8), 1, rounds)  # type: ignore[arg-type]


def test_the_speedup_pairs_the_rounds_and_says_when_the_spread_makes_it_meaningless() -> None:
    steady = BenchmarkCollector()
    steady.add(_cell("no_cache", [4.0, 4.2, 4.4]))
    steady.add(_cell("dynamic", [1.0, 1.05, 1.0]))
    figures = steady.cell_figures(steady.measurements[("t", BenchmarkCase("dynamic", 16, 8))])
    assert figures["speedup_vs_no_cache"] == 4.0  # the ratios 4.0, 4.0, 4.4
    assert (figures["speedup_min"], figures["speedup_max"], figures["speedup_conclusive"]) == (4.0, 4.4, True)
    assert "4.00x (4.00-4.40)" in "\n".join(steady.table("t"))
    busy = BenchmarkCollector()
    busy.add(_cell("no_cache", [1.0, 5.2, 1.1]))  # a second process took the machine during round 2
    busy.add(_cell("dynamic", [1.2, 0.9, 1.0]))
    figures = busy.cell_figures(busy.measurements[("t", BenchmarkCase("dynamic", 16, 8))])
    assert figures["speedup_conclusive"] is False and figures["unstable"] is False
    assert busy.cell_figures(busy.measurements[("t", BenchmarkCase("no_cache", 16, 8))])["unstable"] is True
    table = "\n".join(busy.table("t"))
    assert "x? (" in table and "!" in table and "unstable" in table
    busy.skip("t", BenchmarkCase("dynamic", 512, 8), "prompt 512 + 8 new tokens exceed max_position_embeddings 64")
    assert "not measured: dynamic, prompt 512, 8 new tokens: prompt 512 + 8" in "\n".join(busy.table("t"))
