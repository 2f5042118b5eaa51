"""The built-in invariant suite, collected when a checkpoint is configured.

Each test calls one public helper; select families with -m (causal_lm_shapes, ...)
or single tests with -k.
"""

import pytest

import pytest_causal_lm as clm

pytestmark = pytest.mark.causal_lm


@pytest.mark.causal_lm_shapes
def test_output_shapes(causal_lm: clm.CausalLM) -> None:
    clm.assert_output_shapes(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_shapes
def test_logits_to_keep(causal_lm: clm.CausalLM) -> None:
    clm.assert_logits_to_keep(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)


@pytest.mark.causal_lm_vocab
def test_vocab_alignment(causal_lm: clm.CausalLM) -> None:
    clm.assert_vocab_alignment(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_vocab
def test_special_token_ids(causal_lm: clm.CausalLM) -> None:
    clm.assert_special_tokens_agree(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_causality
def test_prefix_causality(causal_lm: clm.CausalLM) -> None:
    clm.assert_prefix_causal(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance, seed=causal_lm.seed)


@pytest.mark.causal_lm_determinism
def test_determinism(causal_lm: clm.CausalLM) -> None:
    clm.assert_deterministic(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)
