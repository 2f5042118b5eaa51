"""Repo-wide fixtures built on the plugin's ones."""

import pytest

import pytest_causal_lm as clm


@pytest.fixture(scope="session")
def chat_prompt_ids(causal_lm: clm.CausalLM):
    """This repo's chat prompt, tokenized the way the model is served."""
    if not causal_lm.tokenizer.chat_template:
        pytest.skip("this checkpoint has no chat template")
    messages = [{"role": "user", "content": "Name three primary colours."}]
    encoded = causal_lm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"].to(causal_lm.model.device)
