"""Real batch sizes: a kernel that takes another path above 8 rows is caught at 16."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest
import torch

import pytest_causal_lm as clm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_large_batch_path_that_drops_the_padding_mask_fails_padding_at_16_rows(tiny_path: Path, dtype) -> None:
    model, tokenizer = broken.large_batch_drops_padding(tiny_path, dtype)
    tolerance = clm.calibrated_tolerance(clm.tolerance_for(dtype), clm.measure_noise_floor(model, tokenizer))
    with pytest.raises(AssertionError) as caught:
        clm.assert_padding_invariant(model, tokenizer, tolerance=tolerance)
    message = str(caught.value)
    assert re.match(r"padding changes scores: row \d+ of a left-padded batch \(\d+ pad tokens", message)
    assert re.search(r"batch\s+: 16 rows left-padded to \d+ tokens", message)  # the batch of 3 passed
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(\w+Attention\)", message)


def test_a_large_batch_path_in_lower_precision_couples_rows_at_16(tiny_path: Path) -> None:
    model, tokenizer = broken.large_batch_in_bfloat16(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_batch_independent(model, tokenizer)
    message = str(caught.value)
    assert message.startswith(
        "rows are coupled: row 8's scores at position 0 change with the other rows of a batch of 16"
    )
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(\w+Attention\)", message)


def test_healthy_checkpoints_say_which_batch_sizes_they_passed(healthy: clm.CausalLM) -> None:
    padding = clm.assert_padding_invariant(healthy.model, healthy.tokenizer)
    batches = clm.assert_batch_independent(healthy.model, healthy.tokenizer)
    assert "left-padded batches of 3 and 16 rows" in str(padding)
    assert "batches of 2 and 16 rows" in str(batches)
