"""The first invariants pass on healthy tiny checkpoints and fail, usefully, on broken ones."""

from __future__ import annotations

import re

import broken
import pytest
import torch

import pytest_causal_lm as clm
from pytest_causal_lm.checks._common import compare_scores


def test_healthy_checkpoints_pass_every_core_invariant(healthy: clm.CausalLM) -> None:
    model, tokenizer = healthy.model, healthy.tokenizer
    clm.assert_output_shapes(model, tokenizer)
    clm.assert_logits_to_keep(model, tokenizer)
    clm.assert_vocab_alignment(model, tokenizer)
    clm.assert_special_tokens_agree(model, tokenizer)
    clm.assert_prefix_causal(model, tokenizer)
    clm.assert_deterministic(model, tokenizer)


def test_compare_scores_reports_first_position_worst_element_and_count() -> None:
    expected = torch.zeros(4, 5)
    actual = expected.clone()
    actual[2, 1] = 0.5
    actual[3, 4] = 2.0
    mismatch = compare_scores(expected, actual, clm.Tolerance(atol=1e-3, rtol=0))
    assert mismatch is not None
    assert (mismatch.first_position, mismatch.worst_position, mismatch.worst_token_id) == (2, 3, 4)
    assert mismatch.greatest_difference == pytest.approx(2.0)
    assert (mismatch.mismatched, mismatch.total) == (2, 20)
    assert compare_scores(expected, expected + 1e-4, clm.Tolerance(atol=1e-3, rtol=0)) is None


def test_compare_scores_treats_nan_as_mismatch_but_equal_infinities_as_equal() -> None:
    expected = torch.tensor([[0.0, float("-inf")]])
    assert compare_scores(expected, expected.clone(), clm.Tolerance(1e-4, 1e-4)) is None
    mismatch = compare_scores(expected, torch.tensor([[float("nan"), float("-inf")]]), clm.Tolerance(1e-4, 1e-4))
    assert mismatch is not None and mismatch.worst_token_id == 0


def test_prefix_causality_catches_a_mask_that_leaks_the_next_token(tiny_path) -> None:
    model, tokenizer = broken.leaky_mask(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_prefix_causal(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("prefix causality violated: scores at position ")
    assert "natural text: " in message and "Hi dog" in message
    # the leak shows at the position just before the change, with the decoded prefix and figures
    assert re.search(r"change\s+: (extending|appending|changing|replacing)", message)
    assert re.search(r"prefix of moved position : '.*Hi", message)
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at position \d+, score of .+ \(id \d+\)", message)
    assert "tolerance" in message and "atol=0.0001, rtol=0.0001" in message
    assert re.search(r"mismatched elements\s+: \d+ / \d+", message)


def test_determinism_catches_dropout_left_on(tiny_path) -> None:
    model, tokenizer = broken.dropout_left_on(tiny_path)
    with pytest.raises(AssertionError, match=r"non-deterministic scores.*position \d+") as caught:
        clm.assert_deterministic(model, tokenizer)
    assert "dropout applied regardless of eval()" in str(caught.value)


def test_determinism_names_training_mode(qwen3_path) -> None:
    model, tokenizer = broken.dropout_left_on(qwen3_path)
    model.train()
    with pytest.raises(AssertionError, match=r"training mode: call model.eval\(\)"):
        clm.assert_deterministic(model, tokenizer)


def test_shapes_catch_non_finite_logits_with_position_and_token(qwen3_path) -> None:
    model, tokenizer = broken.nan_logits(qwen3_path, position=2, token_id=7)
    with pytest.raises(AssertionError) as caught:
        clm.assert_output_shapes(model, tokenizer)
    message = str(caught.value)
    assert "non-finite logits" in message
    assert re.search(r"first at\s+: batch row 0, position 2, score of '.*' \(id 7\) = nan", message)


def test_shapes_catch_a_head_that_returns_only_the_last_position(llama_path) -> None:
    model, tokenizer = broken.last_row_only(llama_path)
    with pytest.raises(AssertionError, match=r"logits \(batch 1\)\s+: shape \(1, 1, 384\), expected \(1, \d+, 384\)"):
        clm.assert_output_shapes(model, tokenizer)


def test_shapes_catch_a_cache_layer_that_holds_fewer_positions_than_the_input(qwen3_path) -> None:
    model, tokenizer = broken.cache_drops_newest_key(qwen3_path, layer=1)
    with pytest.raises(AssertionError) as caught:
        clm.assert_output_shapes(model, tokenizer)
    message = str(caught.value)
    assert re.search(r"cache layer 1 keys\s+: shape \(1, 2, (\d+), 8\), expected \(1, heads, \d+, head size\)", message)
    assert "cache layer 0" not in message


def test_logits_to_keep_catches_rows_kept_from_the_wrong_end(qwen3_path) -> None:
    model, tokenizer = broken.first_row_kept(qwen3_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_logits_to_keep(model, tokenizer)
    message = str(caught.value)
    assert "logits_to_keep=1 scores differ from the full forward's last 1 row(s)" in message
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at row 0", message)


def test_vocab_alignment_catches_a_tokenizer_that_overruns_the_vocabulary(tiny_path) -> None:
    model, tokenizer = broken.tokenizer_overruns_vocab(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_vocab_alignment(model, tokenizer)
    message = str(caught.value)
    assert "len(tokenizer)" in message and "> config.vocab_size 384" in message
    assert "'<extra_" in message and "(id 384)" in message


def test_vocab_alignment_catches_a_short_lm_head(llama_path) -> None:
    model, tokenizer = broken.short_lm_head(llama_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_vocab_alignment(model, tokenizer)
    message = str(caught.value)
    assert f"logits width                    : {len(tokenizer)} != config.vocab_size 384" in message
    assert f"output embedding (lm_head) rows : {len(tokenizer)} != config.vocab_size 384" in message


def test_special_tokens_catch_a_generation_config_that_stops_at_the_wrong_token(tiny_path) -> None:
    model, tokenizer = broken.mismatched_eos(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_special_tokens_agree(model, tokenizer)
    message = str(caught.value)
    assert "tokenizer eos not among the ids generation stops at" in message
    assert f"tokenizer {tokenizer.eos_token_id} ('<|im_end|>')" in message


def test_special_tokens_accept_several_stop_ids_as_llama3_and_qwen_ship(tiny_path) -> None:
    model, tokenizer = broken.load_healthy(tiny_path)
    model.generation_config.eos_token_id = [tokenizer.pad_token_id, tokenizer.eos_token_id]
    clm.assert_special_tokens_agree(model, tokenizer)


def test_vocab_alignment_accepts_spare_input_embedding_rows_but_not_missing_ones(llama_path) -> None:
    # Moshi keeps one input row beyond vocab_size for its start token: harmless, no id reaches past the scores
    model, tokenizer = broken.load_healthy(llama_path)
    model.set_input_embeddings(torch.nn.Embedding(385, model.config.hidden_size))
    clm.assert_vocab_alignment(model, tokenizer)
    model.set_input_embeddings(torch.nn.Embedding(380, model.config.hidden_size))
    with pytest.raises(AssertionError, match=r"input embedding rows\s+: 380 < config.vocab_size 384"):
        clm.assert_vocab_alignment(model, tokenizer)


def test_the_cache_kind_is_measured_once_per_model_and_again_after_its_forward_changes(tiny_path) -> None:
    """Six checks ask for it; each asking used to cost a forward."""
    from pytest_causal_lm.checks._common import cache_kind

    model, _ = broken.load_healthy(tiny_path)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[5, 6, 7]])
    assert cache_kind(model, ids) == cache_kind(model, ids) == "kv" and len(calls) == 1
    model.forward = lambda *args, **kwargs: type(model).forward(model, *args, **{**kwargs, "use_cache": False})
    assert cache_kind(model, ids) is None  # a port that stops returning its cache is seen
