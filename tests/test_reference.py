"""Reference comparison: zero drift against itself, small against bfloat16, failure on damage or another tokenizer."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import broken
import pytest
import torch

from pytest_causal_lm.checks.reference import (
    DEFAULT_THRESHOLDS,
    assert_close_to_reference,
    compare_to_reference,
    reference_outputs,
)
from pytest_causal_lm.loading import load
from pytest_causal_lm.targets import Target

PROMPTS = ["Hi dog how are you?", "The capital of France is", "def add(a, b):", "1, 2, 3, 4,", "She opened the door"]


@pytest.fixture(scope="module")
def qwen3_reference(qwen3_path: Path):
    model, tokenizer = broken.load_healthy(qwen3_path)
    return model, tokenizer, reference_outputs(model, tokenizer, prompts=PROMPTS)


def _damaged(model):
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        weight = damaged.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    return damaged


def test_a_model_against_itself_has_zero_drift(qwen3_reference) -> None:
    model, tokenizer, reference = qwen3_reference
    report = assert_close_to_reference(model, tokenizer, reference)
    assert report.kl_max < 1e-5 and report.top1_agreement == 1.0 and report.top5_overlap == 1.0
    assert report.greedy_agreement == 1.0 and report.divergences == [] and report.perplexity_delta == 0.0


def test_a_bfloat16_copy_passes_with_small_nonzero_kl(qwen3_reference, tiny_cache: Path) -> None:
    _, _, reference = qwen3_reference
    copy_bf16 = load(Target("tiny:qwen3", "cpu", "bfloat16"), seed=0)
    report = assert_close_to_reference(copy_bf16.model, copy_bf16.tokenizer, reference, tolerance=copy_bf16.tolerance)
    assert 0 < report.kl_mean < DEFAULT_THRESHOLDS["kl_mean"]
    assert report.top1_agreement >= 0.9
    rounded = report.as_dict()
    assert set(rounded) >= {
        "kl_mean",
        "kl_p95",
        "kl_p99",
        "kl_max",
        "top1_agreement",
        "top5_overlap",
        "perplexity_delta",
    }
    assert json.loads(json.dumps(rounded)) == rounded  # snapshot-friendly: plain rounded numbers


def test_damaged_weights_fail_naming_each_threshold_and_the_worst_position(qwen3_reference) -> None:
    model, tokenizer, reference = qwen3_reference
    with pytest.raises(AssertionError) as caught:
        assert_close_to_reference(_damaged(model), tokenizer, reference)
    message = str(caught.value)
    assert re.match(r"drift from the reference .* exceeds \d threshold\(s\)", message)
    assert re.search(r"KL mean\s+: [0-9.e-]+ > threshold 0.01", message)
    assert re.search(r"top-1 agreement\s+: [0-9.]+% < threshold 90%", message)
    assert re.search(
        r"worst position\s+: prompt '.+', position \d+ after '.*': KL [0-9.]+; reference top .+ p=0\.\d+, candidate top",
        message,
    )
    assert "first greedy divergences" in message


def test_a_different_tokenizer_is_described_instead_of_compared(qwen3_reference, llama_path: Path) -> None:
    _, _, reference = qwen3_reference
    model, tokenizer = broken.load_healthy(llama_path)
    with pytest.raises(AssertionError) as caught:
        compare_to_reference(model, tokenizer, reference)
    message = str(caught.value)
    assert message.startswith("tokenizer differs from the reference")
    assert re.search(r"bos_token\s+: reference None, candidate '<\|begin_of_text\|>'", message)
    assert re.search(r"pad_token\s+: reference '<\|endoftext\|>', candidate '<\|pad\|>'", message)
    assert re.search(r"encoding of 'Hi dog how are you\?'\s+: from token 0: reference \[", message)
    assert re.search(r"texts encoded differently\s+: 12 of 12", message)


def test_a_converted_tokenizer_that_encodes_differently_lists_the_first_texts(
    qwen3_reference, qwen3_path: Path, tmp_path: Path
) -> None:
    # a GGUF-style conversion that turned on add_prefix_space: same vocabulary, same special tokens, other ids
    _, _, reference = qwen3_reference
    shutil.copytree(qwen3_path, tmp_path / "converted")
    file = tmp_path / "converted" / "tokenizer.json"
    spec = json.loads(file.read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    file.write_text(json.dumps(spec))
    model, tokenizer = broken.load_healthy(tmp_path / "converted")
    with pytest.raises(AssertionError, match="tokenizer differs from the reference") as caught:
        compare_to_reference(model, tokenizer, reference)
    message = str(caught.value)
    assert "vocabulary size" not in message and "bos_token" not in message
    assert re.search(r"encoding of 'Hi dog how are you\?'\s+: from token 0: reference \[\d+, ", message)
    assert re.search(r"encoding of 'def greet\(name\):\\n    if name:\\n'\s+: from token 0", message)


def test_plugin_compares_every_checkpoint_with_the_reference(pytester: pytest.Pytester, qwen3_path: Path) -> None:
    damaged_dir = pytester.path / "damaged-qwen3"
    model, tokenizer = broken.load_healthy(qwen3_path)
    _damaged(model).save_pretrained(damaged_dir)
    tokenizer.save_pretrained(damaged_dir)
    (pytester.path / "prompts.txt").write_text("\n".join(PROMPTS))
    result = pytester.runpytest(
        "--causal-lm-reference=tiny:qwen3",
        "--causal-lm-reference-prompts=prompts.txt",
        "--causal-lm-checkpoint=tiny:qwen3",
        f"--causal-lm-checkpoint={damaged_dir}",
        "-m",
        "causal_lm_reference",
        "-v",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*test_reference_drift?tiny-qwen3-cpu-float32? PASSED*",
            "*test_reference_drift?damaged-qwen3-cpu-float32? FAILED*",
            "*tiny-qwen3-cpu-float32 reference drift ok KL *: KL mean * top-1 agreement 100.0%*",
            "*damaged-qwen3-cpu-float32 reference drift FAIL *",
        ]
    )


def test_without_a_reference_the_drift_test_skips_with_a_reason(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "-m", "causal_lm_reference", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no reference configured: pass --causal-lm-reference=CKPT*"])
