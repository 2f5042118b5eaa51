"""The checkpoint as users get it: what the loader did with the files (and, below, the checkpoint's own
generation defaults, and whether it was trained at all)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import broken
import pytest
import torch
from conftest import needs_smollm2

import pytest_causal_lm as clm
from pytest_causal_lm.loading import load
from pytest_causal_lm.targets import Target

DTYPES = ("float32", "bfloat16", "float16")


def _loaded(path: Path, dtype: str = "float32") -> clm.CausalLM:
    return load(Target(checkpoint=str(path), device="cpu", dtype=dtype), seed=0, atol=1e-4, rtol=1e-4)


def _weights_failure(path: Path, dtype: str = "float32") -> str:
    lm = _loaded(path, dtype)
    with pytest.raises(AssertionError) as caught:
        clm.assert_weights_loaded(lm.model, lm.loading_info)
    return str(caught.value)


def test_healthy_checkpoints_load_every_stored_tensor(healthy: clm.CausalLM) -> None:
    assert healthy.loading_info.keys() >= {"missing_keys", "unexpected_keys"}
    result = clm.assert_weights_loaded(healthy.model, healthy.loading_info)
    assert result.notes == ["every tensor the model needs was stored, and every stored tensor was used"]


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["single file", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_loaded_names_the_modules_a_wrong_architecture_throws_away(
    qwen3_path: Path, tmp_path: Path, dtype: str, shard_size: str | None
) -> None:
    path = broken.qwen3_saved_under_a_llama_config(qwen3_path, tmp_path / "ckpt", shard_size)
    if shard_size:
        assert len(list(path.glob("model-*.safetensors"))) > 1
    message = _weights_failure(path, dtype)
    assert message.startswith("the checkpoint's weights do not fit LlamaForCausalLM: 4 unexpected keys")
    assert "model.layers.*.self_attn.q_norm.weight: 2" in message and "k_norm.weight: 2" in message
    assert "thrown away" in message
    assert re.search(r"likely cause\s+: LlamaForCausalLM has no module named k_norm, q_norm.*qwen3", message)


def test_weights_loaded_catches_a_head_a_conversion_dropped(llama_path: Path, tmp_path: Path) -> None:
    message = _weights_failure(broken.head_dropped_by_conversion(llama_path, tmp_path / "ckpt"))
    assert "1 missing keys" in message and "randomly initialised): lm_head.weight: 1" in message
    assert "tie_word_embeddings=False" in message and "a conversion dropped the head" in message


def test_weights_loaded_names_a_prefix_left_on_every_key(llama_path: Path, tmp_path: Path) -> None:
    message = _weights_failure(broken.peft_prefix_left_in_keys(llama_path, tmp_path / "ckpt"))
    assert "21 missing keys, 21 unexpected keys" in message
    assert "21 stored keys start with 'base_model.model.' where the model expects ''" in message


def test_weights_loaded_reads_a_pytorch_bin_checkpoint_too(llama_path: Path, tmp_path: Path) -> None:
    path = broken.head_dropped_by_conversion(llama_path, tmp_path / "ckpt")
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")
    message = _weights_failure(path)
    assert "randomly initialised): lm_head.weight: 1" in message


def test_the_classification_head_does_not_copy_in_the_random_head_of_a_dropped_one(
    llama_path: Path, tmp_path: Path
) -> None:
    path = broken.head_dropped_by_conversion(llama_path, tmp_path / "ckpt")
    lm = _loaded(path)
    with pytest.raises(AssertionError, match=r"stores no lm_head.weight and the config does not tie it"):
        clm.assert_classification_head_equivalent(
            lm.model, lm.tokenizer, source=str(path), loading_info=lm.loading_info
        )
    # without the causal load's report the helper cannot tell a renamed head from a dropped one: it fails too
    with pytest.raises(AssertionError, match=r"stores no lm_head.weight"):
        clm.load_score_head_classifier(lm.model, str(path))


def test_a_broken_checkpoint_fails_the_weights_invariant_of_the_built_in_suite(
    pytester: pytest.Pytester, qwen3_path: Path, tmp_path: Path
) -> None:
    path = broken.qwen3_saved_under_a_llama_config(qwen3_path, tmp_path / "ckpt")
    result = pytester.runpytest(f"--causal-lm-checkpoint={path}", "--causal-lm-suite=only", "-k", "weights_loaded")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the checkpoint's weights do not fit LlamaForCausalLM: 4 unexpected keys*"])


# --- a trained checkpoint knows language ---------------------------------------------------------------------

HALF_AND_FULL = (torch.float32, torch.bfloat16, torch.float16)


@needs_smollm2
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_smollm2_knows_language_in_every_dtype(smollm2_safetensors: Path, dtype: torch.dtype) -> None:
    model, tokenizer = broken.load_healthy(smollm2_safetensors)
    result = clm.assert_knows_language(model.to(dtype), tokenizer)
    assert result.figure[1] < 0.3 * math.log(model.config.vocab_size)


@needs_smollm2
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_knows_language_catches_a_reupload_with_another_models_tokenizer(
    smollm2_safetensors: Path, qwen3_path: Path, dtype: torch.dtype
) -> None:
    model, tokenizer = broken.with_another_models_tokenizer(smollm2_safetensors, qwen3_path, dtype)
    with pytest.raises(AssertionError) as caught:
        clm.assert_knows_language(model, tokenizer)
    message = str(caught.value)
    assert re.match(r"the model predicts plain prose no better than chance: mean NLL [\d.]+ nats", message)
    assert re.search(r"worst position\s+: \d+: '.*' \(id \d+\), NLL [\d.]+", message)


@needs_smollm2
@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_knows_language_catches_a_conversion_that_forgot_the_rotary_permutation(
    smollm2_safetensors: Path, dtype: torch.dtype
) -> None:
    model, tokenizer = broken.rotary_permutation_forgotten(smollm2_safetensors, dtype)
    with pytest.raises(AssertionError, match=r"the model does not copy: on 48 random tokens repeated, the second"):
        clm.assert_knows_language(model, tokenizer)


def test_random_weights_fail_knows_language_and_the_option_skips_it_saying_why(
    pytester: pytest.Pytester, qwen3_path: Path
) -> None:
    plain = pytester.runpytest(f"--causal-lm-checkpoint={qwen3_path}", "--causal-lm-suite=only", "-k", "knows_language")
    plain.assert_outcomes(failed=1)
    plain.stdout.fnmatch_lines(["*the model predicts plain prose no better than chance*"])
    opted = pytester.runpytest(
        f"--causal-lm-checkpoint={qwen3_path}", "--causal-lm-suite=only", "--causal-lm-random-weights", "-rs"
    )
    opted.stdout.fnmatch_lines(["*1 x random weights on purpose (--causal-lm-random-weights): nothing to know"])
    assert "failed" not in opted.parseoutcomes()


# --- the checkpoint's own generation defaults ----------------------------------------------------------------


def test_healthy_checkpoints_generate_with_their_own_defaults(healthy: clm.CausalLM) -> None:
    result = clm.assert_generation_defaults(healthy.model, healthy.tokenizer)
    assert re.match(r"a plain generate\(\) gave \d+ new tokens: ", result.notes[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_generation_defaults_catch_a_temperature_of_zero_that_crashes_a_plain_call(
    qwen3_path: Path, tmp_path: Path, dtype: str
) -> None:
    lm = _loaded(broken.temperature_zero_for_greedy(qwen3_path, tmp_path / "ckpt"), dtype)
    with pytest.raises(AssertionError) as caught:
        clm.assert_generation_defaults(lm.model, lm.tokenizer)
    message = str(caught.value)
    assert message.startswith("a plain generate() with the checkpoint's own defaults raises")
    assert re.search(r"error\s+: ValueError: .*temperature", message)


def test_generation_defaults_catch_sampling_settings_that_a_greedy_default_ignores(
    qwen3_path: Path, tmp_path: Path
) -> None:
    lm = _loaded(broken.sampling_settings_without_sampling(qwen3_path, tmp_path / "ckpt"))
    with pytest.raises(AssertionError) as caught:
        clm.assert_generation_defaults(lm.model, lm.tokenizer)
    message = str(caught.value)
    assert message.startswith("the checkpoint's generation_config.json has settings generate ignores or cannot use")
    assert "`temperature` is set to `0.6`" in message and "`top_p` is set to `0.9`" in message


def test_generation_defaults_catch_stop_ids_outside_the_vocabulary(qwen3_path: Path, tmp_path: Path) -> None:
    lm = _loaded(broken.stop_id_of_another_model(qwen3_path, tmp_path / "ckpt"))
    with pytest.raises(AssertionError, match=r"eos_token_id\s+: \[128001, 128009\]: \[128001, 128009\] outside"):
        clm.assert_generation_defaults(lm.model, lm.tokenizer)


def test_generation_defaults_note_what_changes_a_plain_calls_output(qwen3_path: Path, tmp_path: Path) -> None:
    path = broken._copy_checkpoint(qwen3_path, tmp_path / "ckpt")
    broken._edit_generation_config(path, do_sample=True, temperature=0.7, repetition_penalty=1.3)
    lm = _loaded(path)
    notes = clm.assert_generation_defaults(lm.model, lm.tokenizer).notes
    assert any(note.startswith("samples by default (temperature=0.7,") for note in notes)
    assert "repetition_penalty=1.3: a plain call's text differs from greedy decoding" in notes


# --- far positions -------------------------------------------------------------------------------------------


def test_healthy_checkpoints_score_a_window_alike_at_far_positions(healthy: clm.CausalLM) -> None:
    result = clm.assert_far_positions_consistent(healthy.model, healthy.tokenizer)
    assert result.figure[1] < 1e-4  # float32: the shift costs rounding only
    assert result.notes == ["RoPE (default): a 16-token window at offsets [128, 256, 496] of 512 positions"]


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_far_positions_catch_a_rotary_table_built_for_a_shorter_context(tiny_path: Path, dtype: torch.dtype) -> None:
    model, tokenizer = broken.rotary_table_for_a_shorter_context(tiny_path, positions=64, dtype=dtype)
    with pytest.raises(AssertionError) as caught:
        clm.assert_far_positions_consistent(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("far positions: the same tokens at offset 128 score unlike at the start (RoPE")
    assert re.search(r"worst position\s+: \d+ of the window, after '", message)
    assert re.search(r"KL\s+: [\d.]+ nats > 0.25", message) and "top-1 at 128" in message


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_far_positions_catch_learned_position_rows_that_overflowed_in_an_export(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    from pytest_causal_lm.tiny import materialize

    path = broken.position_rows_overflowed_in_export(materialize("tiny:gpt2"), tmp_path / "ckpt", first_row=300)
    model, tokenizer = broken.load_healthy(path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_far_positions_consistent(model.to(dtype), tokenizer)
    message = str(caught.value)
    assert message.startswith("far positions: non-finite scores at position 496 (learned position embeddings)")
    assert "transformer.wpe: 512 rows, 16 non-finite among rows 496..511" in message


def test_far_positions_skip_an_encoding_that_scales_with_each_calls_length(qwen3_path: Path) -> None:
    model, tokenizer = broken.longrope_switches_per_call(qwen3_path)
    with pytest.raises(pytest.skip.Exception, match=r"RoPE longrope scales its frequencies with each call's length"):
        clm.assert_far_positions_consistent(model, tokenizer)
