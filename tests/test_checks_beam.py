"""Beam search: one beam is greedy, the cache changes neither beams nor scores, scores are forward log-probabilities."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest
import torch
from conftest import in_dtype as _in

import pytest_causal_lm as clm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_healthy_checkpoints_pass_with_beams_that_really_reorder(tiny_path: Path, dtype) -> None:
    model, tokenizer, tolerance = _in(dtype, broken.load_healthy(tiny_path))
    result = clm.assert_beam_search_consistent(model, tokenizer, tolerance=tolerance)
    assert result.figure[0] == "reorders" and result.figure[1] > 0
    assert re.search(r"4 beams, 2 prompts: a returned beam changed cache rows at \d+ step\(s\)", str(result))
    if dtype == torch.float32:
        assert result.greatest_difference < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_port_that_reorders_keys_but_not_values_fails(tiny_path: Path, dtype) -> None:
    model, tokenizer, tolerance = _in(dtype, broken.reorder_keys_only(tiny_path))
    with pytest.raises(AssertionError) as caught:
        clm.assert_beam_search_consistent(model, tokenizer, tolerance=tolerance)
    message = str(caught.value)
    assert re.match(r"beam search: the score of returned sequence \d is not its tokens' log-probabilities", message)
    assert re.search(
        r"generate's score\s+: -?[0-9.]+\n\s+forward\s+: -?[0-9.]+ \(sum -?[0-9.]+ over \d+ tokens", message
    )
    assert re.search(r"weakest token\s+: step \d+, '.*' \(id \d+\): log-probability", message)


def test_without_the_cache_check_a_reorder_bug_still_fails_on_the_cache_comparison(qwen3_path: Path) -> None:
    from pytest_causal_lm.checks import beam

    model, tokenizer = broken.reorder_keys_only(qwen3_path)
    ids = clm.checks._common.encode(tokenizer, "Hi dog how are you?", model.device)
    cached = beam._searched(model, tokenizer, ids, True, 8)
    uncached = beam._searched(model, tokenizer, ids, False, 8)
    result = clm.CheckResult("beam search", tolerance=clm.tolerance_for("float32"))
    with pytest.raises(AssertionError) as caught:
        beam._check_same_beams(model, tokenizer, ids, cached, uncached, result)
    message = str(caught.value)
    assert message.startswith("beam search with the cache differs from beam search without it: returned sequence")
    assert "the cache is not reordered with the beams" in message
