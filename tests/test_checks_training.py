"""The training step: the loss from labels=, a padded batch, gradient checkpointing, train() vs eval()."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest
import torch

import pytest_causal_lm as clm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _checkpointing(model) -> bool:
    """Activation checkpointing on, under the installed transformers' name (renamed in 5.25)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_healthy_checkpoints_pass_and_are_left_as_found(request: pytest.FixtureRequest, name: str, dtype) -> None:
    model, tokenizer = broken.load_healthy(request.getfixturevalue(f"{name}_path"))
    model.to(dtype)
    result = clm.assert_training_step_consistent(model, tokenizer)
    assert 0 <= result.greatest_difference < 0.5 * result.tolerance.atol, str(result)  # float32 may agree exactly
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not _checkpointing(model)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_loss_whose_labels_are_not_shifted_fails_naming_it(qwen3_path: Path, dtype) -> None:
    model, tokenizer = broken.loss_without_shift(qwen3_path, dtype=dtype)
    with pytest.raises(AssertionError, match=r"not the mean cross-entropy of the logits shifted by one") as caught:
        clm.assert_training_step_consistent(model, tokenizer)
    message = str(caught.value)
    assert "likely cause  : the labels are not shifted: position t is scored against label t" in message, message
    assert "labels -100 at positions 0..2" in message and "(difference " in message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_loss_that_counts_masked_prompt_tokens_fails_naming_it(qwen3_path: Path, dtype) -> None:
    model, tokenizer = broken.loss_counting_masked_tokens(qwen3_path, dtype=dtype)
    with pytest.raises(AssertionError, match=r"likely cause  : labels of -100 are counted"):
        clm.assert_training_step_consistent(model, tokenizer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_loss_averaged_per_row_fails_against_the_token_weighted_rows(llama_path: Path, dtype) -> None:
    # llama's rows differ in length and loss (0.07 between the two means), above every dtype's atol
    model, tokenizer = broken.loss_averaged_per_row(llama_path, dtype=dtype)
    with pytest.raises(AssertionError, match=r"right-padded batch's loss is not the token-weighted loss") as caught:
        clm.assert_training_step_consistent(model, tokenizer)
    assert "rows alone: " in str(caught.value) and "tokens [" in str(caught.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_layer_detached_under_checkpointing_fails_naming_the_parameter(llama_path: Path, dtype) -> None:
    model, tokenizer = broken.checkpointing_detaches_a_layer(llama_path, layer=1, dtype=dtype)
    with pytest.raises(AssertionError, match=r"gradient checkpointing changes the gradient of model\.") as caught:
        clm.assert_training_step_consistent(model, tokenizer)
    message = str(caught.value)
    assert re.search(r"worst element         : \(\d+, \d+\): without -?[\d.]+, with 0\n", message), message
    assert not model.training and not _checkpointing(model)  # left as found after a failure too


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_hard_coded_in_training_mode_fails_though_the_config_has_none(qwen3_path: Path, dtype) -> None:
    model, tokenizer = broken.dropout_hard_coded(qwen3_path, dtype=dtype)
    with pytest.raises(
        AssertionError, match=r"train\(\) scores differ from eval\(\) with no dropout configured"
    ) as caught:
        clm.assert_training_step_consistent(model, tokenizer)
    assert re.search(
        r"first departing module\s+: model.layers.0.mlp \(Qwen3MLP\): output at position", str(caught.value)
    )
    assert not model.training
    clm.assert_deterministic(model, tokenizer)  # eval() is deterministic: only the training step sees it
