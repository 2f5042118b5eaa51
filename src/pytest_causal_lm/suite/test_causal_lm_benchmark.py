"""Forced greedy generation timed per mode and cell, by pytest-benchmark (opt-in: --causal-lm-benchmark).

Each test generates exactly N new tokens after a P-token prompt in one mode (no cache, dynamic cache, static
cache, static cache + compile), after warm-up rounds; the arrival of every token is timed, and the figures
(time to first token, inter-token latency percentiles, tokens/s, peak memory, bandwidth utilisation, what
bounds decoding) land in the benchmark's extra_info, and so in --benchmark-json. It fails only if the modes
disagree on the tokens.
"""

import pytest

import pytest_causal_lm as clm

pytestmark = pytest.mark.causal_lm_benchmark


def test_generation_speed(
    causal_lm: clm.CausalLM, benchmark, request: pytest.FixtureRequest, causal_lm_benchmark_case
) -> None:
    session = clm.session_of(request.config)
    clm.benchmark_generation(causal_lm, benchmark, session.benchmarks, session.settings, causal_lm_benchmark_case)
