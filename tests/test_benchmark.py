"""The opt-in cached vs uncached benchmark, on a tiny checkpoint with very small settings."""

from __future__ import annotations

import json

import pytest

from pytest_causal_lm.benchmark import BenchmarkCollector, Measurement, peak_bandwidth

SMALL = (
    "--causal-lm-checkpoint=tiny:qwen3",
    "--causal-lm-benchmark-new-tokens=2,6",
    "--causal-lm-benchmark-prompt-length=8",
    "--causal-lm-benchmark-rounds=1",
    "-k",
    "generation_speed",
)


def test_ordinary_runs_skip_the_benchmarks_with_a_reason(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*SMALL, "-rs")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*benchmarks are opt-in: pass --causal-lm-benchmark (or --benchmark-only)*"])


def test_benchmark_writes_json_fields_a_table_and_a_png(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *SMALL, "--causal-lm-benchmark", "--benchmark-json=bench.json", "--causal-lm-benchmark-plot=plots/speed.png"
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*causal-lm benchmark: greedy generation, cached vs uncached*",
            "tiny-qwen3-cpu-float32",
            "*new tokens  uncached tok/s  cached tok/s  speedup*",
            "*2 *x",
            "*6 *x",
            f"plot of time vs new tokens: {pytester.path / 'plots' / 'speed.png'}",
        ]
    )
    png = (pytester.path / "plots" / "speed.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    benchmarks = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    assert len(benchmarks) == 4
    for entry in benchmarks:
        info = entry["extra_info"]
        assert info["mode"] in ("cached", "uncached") and info["new_tokens"] in (2, 6)
        assert info["prompt_length"] == 8 and info["device"] == "cpu" and info["dtype"] == "float32"
        for field in ("median_seconds", "prefill_seconds", "decode_seconds_per_token", "tokens_per_second"):
            assert info[field] > 0, field
        assert info["speedup_cached_vs_uncached"] > 0
        assert entry["group"] == f"tiny-qwen3-cpu-float32 new_tokens={info['new_tokens']}"
        assert entry["stats"]["rounds"] == 1


def test_benchmark_skip_and_only_behave_as_pytest_benchmark_users_expect(pytester: pytest.Pytester) -> None:
    skipped = pytester.runpytest(*SMALL, "--causal-lm-benchmark", "--benchmark-skip")
    skipped.assert_outcomes(skipped=4)
    only = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-benchmark-new-tokens=2",
        "--causal-lm-benchmark-prompt-length=8",
        "--causal-lm-benchmark-rounds=1",
        "--benchmark-only",
        "-m",
        "causal_lm_benchmark or causal_lm_determinism",
    )
    only.assert_outcomes(passed=2, skipped=1)  # the invariant test is not a benchmark


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


def test_benchmark_fails_when_cached_and_uncached_tokens_differ(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(BROKEN_CACHE_CONFTEST)
    result = pytester.runpytest(*SMALL, "--causal-lm-benchmark")
    # with 2 new tokens the damaged cache is read once and happens to pick the same token; with 6 it diverges
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        ["E * cached and uncached generation disagree (6 new tokens) at step * with a clear score margin*"]
    )


def test_speedup_table_and_bandwidth_lookup() -> None:
    collector = BenchmarkCollector()
    for use_cache, seconds in ((False, 4.0), (True, 1.0)):
        collector.add(Measurement("t", use_cache, 8, 32, seconds, 0.1, [1] * 8, extra_info={}))
    assert collector.table("t") == [
        "new tokens  uncached tok/s  cached tok/s  speedup",
        "         8             2.0           8.0    4.00x",
    ]
    assert collector.measurements[("t", True, 8)].extra_info["speedup_cached_vs_uncached"] == 4.0
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth("Intel Xeon") is None
