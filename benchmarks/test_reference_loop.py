"""The plugin's static_compiled mode against a hand-written static-cache + compiled greedy loop, in one run.

Opt-in (the project's `pytest` collects tests/ only):

    CAUSAL_LM_TEST_REFERENCE_LOOP_CHECKPOINT=path/to/checkpoint pytest benchmarks/test_reference_loop.py -s

Both decode the same prompt after warm-up rounds that compile; the decode rate (one over the median
step time) of the plugin's mode must be within 10% of the hand loop's, and both rates land in
pytest-benchmark's extra_info.
"""

from __future__ import annotations

import os
import statistics

import pytest

CHECKPOINT = os.environ.get("CAUSAL_LM_TEST_REFERENCE_LOOP_CHECKPOINT")
NEW_TOKENS, PROMPT, ROUNDS = 32, 32, 5


@pytest.mark.skipif(not CHECKPOINT, reason="set CAUSAL_LM_TEST_REFERENCE_LOOP_CHECKPOINT to the checkpoint to measure")
def test_static_compiled_mode_decodes_within_10_percent_of_the_hand_written_loop(benchmark) -> None:
    import torch
    from reference_loop import reference_decode_seconds
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_causal_lm.benchmark import random_prompt, timed_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    prompt = random_prompt(model, tokenizer, PROMPT)
    rounds = []
    benchmark.pedantic(
        lambda: rounds.append(timed_generate(model, tokenizer, prompt, NEW_TOKENS, "static_compiled")),
        rounds=ROUNDS,
        warmup_rounds=2,
        iterations=1,
    )
    plugin_step = statistics.median(s for r in rounds[2:] for s in r.step_seconds)
    tokens, reference_step = reference_decode_seconds(model, prompt, NEW_TOKENS, rounds=ROUNDS)
    plugin_rate, reference_rate = 1 / plugin_step, 1 / reference_step
    benchmark.extra_info.update(
        device=device,
        plugin_static_compiled_tokens_per_second=round(plugin_rate, 2),
        reference_loop_tokens_per_second=round(reference_rate, 2),
        ratio=round(plugin_rate / reference_rate, 3),
    )
    print(f"\nstatic_compiled {plugin_rate:.1f} tok/s, hand-written loop {reference_rate:.1f} tok/s")
    assert rounds[-1].tokens == tokens, "the two loops decoded different tokens"
    assert abs(plugin_rate / reference_rate - 1) <= 0.10, (
        f"static_compiled decodes at {plugin_rate:.1f} tok/s, the hand-written loop at {reference_rate:.1f} tok/s"
    )
