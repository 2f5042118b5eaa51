"""The plugin's fixtures and helpers on this repo's own prompts."""

import pytest_causal_lm as clm

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Hi dog how are you?"]


def test_prompts_are_causal(causal_lm: clm.CausalLM) -> None:
    clm.assert_prefix_causal(
        causal_lm.model, causal_lm.tokenizer, prefix=PROMPTS[0], continuation=" Paris.", tolerance=causal_lm.tolerance
    )


def test_padding_does_not_change_answers(causal_lm: clm.CausalLM) -> None:
    clm.assert_padding_invariant(causal_lm.model, causal_lm.tokenizer, prompts=PROMPTS, tolerance=causal_lm.tolerance)


def test_generation_is_a_loop_of_classifications(causal_lm: clm.CausalLM) -> None:
    result = clm.assert_greedy_parity(
        causal_lm.model, causal_lm.tokenizer, prompts=PROMPTS, tolerance=causal_lm.tolerance
    )
    assert result.greatest_difference <= causal_lm.tolerance.atol * 10


def test_chat_answer_is_the_argmax_loop(causal_lm: clm.CausalLM, chat_prompt_ids) -> None:
    stop = {causal_lm.tokenizer.eos_token_id}
    uncached = clm.greedy_loop(causal_lm.model, chat_prompt_ids, max_new_tokens=8, stop_ids=stop)
    cached = clm.greedy_loop(causal_lm.model, chat_prompt_ids, max_new_tokens=8, stop_ids=stop, use_cache=True)
    assert cached.tokens == uncached.tokens
