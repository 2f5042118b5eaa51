"""Packed sequences and 4D masks: each sequence scores as it does alone."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest
import torch
from conftest import failure_of
from conftest import in_dtype as _in

import pytest_causal_lm as clm
from pytest_causal_lm.checks import packing

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _failure(built, dtype=torch.float32) -> str:
    return failure_of(clm.assert_packed_sequences_consistent, built, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_healthy_checkpoints_pass_every_layout(tiny_path: Path, dtype) -> None:
    model, tokenizer, tolerance = _in(dtype, broken.load_healthy(tiny_path))
    result = clm.assert_packed_sequences_consistent(model, tokenizer, tolerance=tolerance)
    assert "3 sequences packed in two orders (position_ids restarting at 0 per sequence" in str(result)
    assert "a 4D block-causal mask and a prefix shared by two continuations under one 4D mask" in str(result)
    assert result.greatest_difference <= tolerance.atol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_kernel_that_ignores_the_mask_it_is_given_fails_on_packed_rows(qwen3_path: Path, dtype) -> None:
    message = _failure(broken.padding_mask_ignored(qwen3_path), dtype)
    assert re.match(
        r"packed by position_ids \(.*\): sequence [12] '.*' scores differently from the sequence alone", message
    )
    assert re.search(r"packed at\s+: tokens \d+\.\.\d+ of row 0 \(\d+ tokens\)", message)
    assert re.search(r"first position in the sequence\s+: \d+", message)
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at position in the sequence \d+, score of '.*'", message)
    assert "a 4D block-causal mask over the same row differs from the sequence alone too" in message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_port_that_counts_rotary_positions_itself_fails(llama_path: Path, dtype) -> None:
    """RoPE is relative: a packed sequence shifted as a whole scores the same, so packing alone cannot see this;
    the second continuation after a shared prefix sits at the wrong distance from the prefix and fails."""
    message = _failure(broken.rotary_positions_counted_by_the_port(llama_path), dtype)
    # in bfloat16 the shifted positions' rounded cos/sin already move a packed sequence past the noise floor
    assert re.match(
        r"(4D mask sharing a prefix between two continuations: continuation 1 scores differently from the prefix"
        r"|packed by position_ids .*: sequence [12] )",
        message,
    )
    assert re.search(r"first departing module\s+: model\.(rotary_emb|layers\.0)", message)


def test_a_forward_that_fills_in_a_default_mask_is_reported_as_not_promised(qwen3_path: Path) -> None:
    """transformers detects packing only in a mask-less call: OPT, BioGPT and others fill in a default mask, and
    so does this port; the verdict says the format is not promised there and that it does not hold."""
    model, tokenizer = broken.default_attention_mask_filled_in(qwen3_path)
    result = clm.assert_packed_sequences_consistent(model, tokenizer)
    assert re.search(
        r"packed by position_ids: not promised for Qwen3ForCausalLM: transformers' packed-sequence detection did "
        r"not run in its forward \(it runs only without an attention_mask and a cache\); not honoured "
        r"\(sequence [12] .* differs by [0-9.]+\)",
        str(result),
    )
    assert "a 4D block-causal mask and a prefix shared by two continuations" in str(result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_port_that_makes_a_4d_mask_additive_again_fails_on_the_4d_layouts(tiny_path: Path, dtype) -> None:
    """Not in float16: there the twice-converted mask puts every allowed key at -65504 and every blocked one at
    -inf; the same constant on every allowed score leaves the softmax as it was, and the scores stay within the
    tolerance (measured on this CPU)."""
    message = _failure(broken.every_mask_made_additive(tiny_path), dtype)
    assert re.match(r"4D block-causal mask: sequence 0 '.*' scores differently from the sequence alone", message)
    assert "the 4D mask does not reach attention as given" in message


def test_the_shared_prefix_layout_compares_each_continuation_with_prefix_and_continuation_alone(
    qwen3_path: Path,
) -> None:
    model, tokenizer = broken.padding_mask_ignored(qwen3_path)
    prefix = tokenizer("Hi dog how are you?")["input_ids"]
    tails = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in packing.CONTINUATIONS]
    layout = packing._shared_prefix(model, prefix, tails)
    result = clm.CheckResult("packed sequences", tolerance=clm.tolerance_for("float32"))
    with pytest.raises(AssertionError) as caught:  # the causal-only kernel lets continuation 1 see continuation 0
        packing._run_layout(model, tokenizer, layout, {}, result)
    message = str(caught.value)
    assert message.startswith(
        "4D mask sharing a prefix between two continuations: continuation 1 scores differently from the prefix and it alone"
    )
    healthy, tokenizer = broken.load_healthy(qwen3_path)
    assert packing._run_layout(healthy, tokenizer, packing._shared_prefix(healthy, prefix, tails), {}, result)


def test_a_model_without_position_ids_skips_with_the_reason(qwen3_path: Path) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    original = model.forward
    model.forward = lambda input_ids=None, attention_mask=None: original(input_ids, attention_mask=attention_mask)
    with pytest.raises(pytest.skip.Exception, match="takes no position_ids: packed sequences cannot restart"):
        clm.assert_packed_sequences_consistent(model, tokenizer)


def test_an_architecture_that_takes_only_2d_masks_gets_a_note_not_a_failure() -> None:
    """OpenAI GPT builds its own mask from a 2D one: transformers promises no 4D mask there, and the verdict says
    what the call did instead of failing the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_causal_lm.tiny import materialize

    path = materialize("tiny:openai-gpt")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = clm.assert_packed_sequences_consistent(model, tokenizer)
    assert re.search(
        r"4D block-causal mask: not promised for OpenAIGPTLMHeadModel: its forward hands no 4D mask to "
        r"transformers' masking_utils \(which passes one through as given\) and takes none itself; raises RuntimeError",
        str(result),
    )


def test_an_error_on_a_packed_row_is_a_failure_even_where_packing_is_not_detected(qwen3_path: Path) -> None:
    """A packed row is a plain forward with position_ids: raising there is the model's bug, not a limit."""
    model, tokenizer = broken.default_attention_mask_filled_in(qwen3_path)
    original = model.forward

    def forward(input_ids=None, position_ids=None, **kwargs):
        if position_ids is not None and bool((position_ids[:, 1:] < position_ids[:, :-1]).any()):
            raise IndexError("position index out of range")
        return original(input_ids=input_ids, position_ids=position_ids, **kwargs)

    model.forward = forward
    with pytest.raises(AssertionError, match=r"packed by position_ids .* raised IndexError: position index"):
        clm.assert_packed_sequences_consistent(model, tokenizer)
