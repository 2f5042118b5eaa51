"""Sampling: seeded runs repeat, raw scores are a forward's, processed scores are the settings applied by hand,
top_k=1 is greedy."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest
import torch
from conftest import failure_of, needs_smollm2
from conftest import in_dtype as _in
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import pytest_causal_lm as clm
from pytest_causal_lm.checks import sampling
from pytest_causal_lm.checks.sampling import SamplingSettings, processed_by_hand

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _failure(built, dtype=torch.float32) -> str:
    return failure_of(clm.assert_sampling_consistent, built, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_healthy_checkpoints_pass_with_representative_settings(tiny_path: Path, dtype) -> None:
    model, tokenizer, tolerance = _in(dtype, broken.load_healthy(tiny_path))
    result = clm.assert_sampling_consistent(model, tokenizer, tolerance=tolerance)
    assert "representative settings (the checkpoint does not sample by default): temperature 0.7, top_k 20" in str(
        result
    )
    assert "2 samples of 2 prompts, seed 0" in str(result)


@pytest.mark.parametrize(
    ("saved", "shown"),
    [
        ({"temperature": 0.6, "top_k": 20, "top_p": 0.95}, "temperature 0.6, top_k 20, top_p 0.95, min_p None"),
        ({"temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.2}, "top_k 50, top_p 0.95"),
    ],
    ids=["qwen3-style", "top_k-unset"],
)
def test_a_checkpoint_that_samples_is_checked_with_its_own_settings(
    qwen3_path: Path, tmp_path: Path, saved: dict, shown: str
) -> None:
    broken._copy_checkpoint(qwen3_path, tmp_path / "ckpt")
    broken._edit_generation_config(tmp_path / "ckpt", do_sample=True, **saved)
    model, tokenizer = broken.load_healthy(tmp_path / "ckpt")
    result = clm.assert_sampling_consistent(model, tokenizer)
    assert "the checkpoint's generation_config (do_sample: true; unset fields at transformers' defaults)" in str(result)
    assert shown in str(result)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_port_whose_processor_list_predates_the_merged_warpers_fails(qwen3_path: Path, dtype) -> None:
    message = _failure(broken.warpers_left_out(qwen3_path), dtype)
    assert re.match(
        r"sampling: at step \d+ of row \d generate keeps '.*' \(id \d+\), which the sampling settings remove", message
    )
    assert re.search(r"that token\s+: raw score -?[0-9.]+, rank \d+ of 384, probability 0 under the settings", message)
    assert re.search(r"tokens kept\s+: \d+ by generate, \d+ by the settings", message)
    assert "likely cause   : a setting was not applied" in message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_port_that_applies_the_temperature_again_fails(llama_path: Path, dtype) -> None:
    message = _failure(broken.temperature_applied_twice(llama_path), dtype)
    assert re.match(
        r"sampling: at step \d+ of row \d generate (removes '.*' \(id \d+\), which the sampling settings keep"
        r"|gives '.*' \(id \d+\) another probability than the sampling settings do)",
        message,
    )
    assert "settings" in message and "temperature 0.7, top_k 20, top_p 0.9, min_p 0.05" in message


@needs_smollm2
def test_a_summarisation_template_in_generation_config_fails_naming_the_field(
    smollm2_safetensors: Path, tmp_path: Path
) -> None:
    """Trained weights continue the repeating prompt with the n-gram it repeats: the one token the template bans."""
    message = _failure(broken.load_healthy(broken.summarisation_generation_config(smollm2_safetensors, tmp_path / "s")))
    assert re.match(r"sampling: at step \d+ of row \d generate removes '.*' \(id \d+\), which the sampling", message)
    assert re.search(r"generation_config also sets\s+: no_repeat_ngram_size=3", message)
    assert "transformers also applies no_repeat_ngram_size=3 from generation_config" in message
    assert "temperature 0.8, top_k 50, top_p 0.95" in message  # the checkpoint's own settings were used


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_positions_restarting_with_the_cache_fail_on_the_sampled_path(tiny_path: Path, dtype) -> None:
    message = _failure(broken.positions_restart_with_cache(tiny_path), dtype)
    assert re.match(
        r"sampling \(seed 0, temperature 0.7.*\): step 1 of row 0 scores differently from one forward pass", message
    )
    assert re.search(r"first departs\s+:", message) or "greatest |difference|" in message


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jitter_that_torch_manual_seed_does_not_seed_fails_reproducibility(qwen3_path: Path, dtype) -> None:
    message = _failure(broken.router_jitter_from_numpy(qwen3_path), dtype)
    assert message.startswith("sampling is not reproducible: step 0 of row 0 scores differently in a second run")
    assert "randomness in the forward pass that torch.manual_seed does not seed" in message


def test_top_k_one_that_is_not_greedy_fails(qwen3_path: Path) -> None:
    model, tokenizer = broken.warpers_left_out(qwen3_path)
    ids = clm.checks._common.encode(tokenizer, "Hi dog how are you?", model.device)
    result = clm.CheckResult("sampling", tolerance=clm.tolerance_for("float32"))
    with pytest.raises(AssertionError) as caught:
        sampling._check_top_k_one_is_greedy(model, tokenizer, ids, 8, 0, result)
    message = str(caught.value)
    assert re.match(r"sampling with top_k=1 draws another token than greedy at step \d+", message)
    assert re.search(r"raw scores there\s+: '.*' \(id \d+\) -?[0-9.]+ \(greedy's\), '.*' \(id \d+\)", message)


def _transformers_processed(scores, history, settings: SamplingSettings):
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(settings.repetition_penalty),
            TemperatureLogitsWarper(settings.temperature),
            TopKLogitsWarper(settings.top_k),
            TopPLogitsWarper(settings.top_p),
            MinPLogitsWarper(settings.min_p),
        ]
    )
    return processors(torch.tensor([history]), scores[None].clone())[0]


@pytest.mark.parametrize("rounded_to", [torch.float32, torch.bfloat16], ids=str)
def test_the_settings_by_hand_keep_what_transformers_keeps_within_the_threshold_slack(rounded_to) -> None:
    """The by-hand definitions agree with transformers' processors on random scores, ties included (bfloat16
    rounding makes many): no false alarm comes from the comparison itself."""
    settings = SamplingSettings(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        scores = (torch.randn(512, generator=generator) * 3).to(rounded_to).float()
        history = torch.randint(0, 512, (12,), generator=generator).tolist()
        theirs = _transformers_processed(scores, history, settings).isfinite()
        narrow = processed_by_hand(scores, history, settings, -sampling.THRESHOLD_SLACK).isfinite()
        wide = processed_by_hand(scores, history, settings, sampling.THRESHOLD_SLACK).isfinite()
        assert bool((narrow <= theirs).all()) and bool((theirs <= wide).all())
        exact = processed_by_hand(scores, history, settings)
        both = theirs & exact.isfinite()
        expected = _transformers_processed(scores, history, settings)[both].log_softmax(-1)
        assert torch.allclose(exact[both].log_softmax(-1), expected, atol=sampling.PROCESSED_ATOL)


def test_sampling_leaves_the_checkpoint_generation_config_as_it_was(qwen3_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(qwen3_path)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_path)
    before = model.generation_config.to_dict()
    clm.assert_sampling_consistent(model, tokenizer)
    assert model.generation_config.to_dict() == before
