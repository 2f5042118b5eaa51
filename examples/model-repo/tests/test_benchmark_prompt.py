"""Benchmark example: time this repo's own prompt with pytest-benchmark (run with --benchmark-only).

The built-in sweep runs with --causal-lm-benchmark; this shows a custom measurement
built from the same pieces.
"""

import pytest_causal_lm as clm


def test_answer_latency(benchmark, causal_lm: clm.CausalLM) -> None:
    ids = causal_lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(causal_lm.model.device)
    tokens = benchmark.pedantic(
        clm.forced_generate, args=(causal_lm.model, causal_lm.tokenizer, ids, 16, "dynamic"), rounds=3, warmup_rounds=1
    )
    assert len(tokens) == 16
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_second"] = 16 / benchmark.stats.stats.median
