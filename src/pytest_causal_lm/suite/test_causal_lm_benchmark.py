"""Cached vs uncached greedy generation, timed by pytest-benchmark (opt-in: --causal-lm-benchmark).

Each test generates exactly N new tokens, with or without the KV cache, after a
warm-up round; every forward pass is timed, and the figures land in the
benchmark's extra_info (and so in --benchmark-json). It fails only if cached and
uncached generation disagree.
"""

import pytest

import pytest_causal_lm as clm

pytestmark = pytest.mark.causal_lm_benchmark


def test_generation_speed(
    causal_lm: clm.CausalLM,
    benchmark,
    request: pytest.FixtureRequest,
    causal_lm_use_cache: bool,
    causal_lm_new_tokens: int,
) -> None:
    session = clm.session_of(request.config)
    clm.benchmark_generation(
        causal_lm,
        benchmark,
        session.benchmarks,
        session.settings,
        use_cache=causal_lm_use_cache,
        new_tokens=causal_lm_new_tokens,
    )
