"""Snapshot what the checkpoint says about this repo's own prompts.

First run: `pytest --snapshot-update` writes snapshots/test_behaviour/*.json; commit them.
Later runs compare against them: a changed token or a log-probability that moved
beyond the stored tolerance fails with a readable diff.
"""

import pytest_causal_lm as clm

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_my_prompts(causal_lm: clm.CausalLM, causal_lm_snapshot) -> None:
    record = clm.behaviour_record(causal_lm.model, causal_lm.tokenizer, prompts=PROMPTS, chat=False, max_new_tokens=8)
    assert causal_lm_snapshot == record
