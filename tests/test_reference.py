"""Reference comparison: zero drift against itself, small against bfloat16, failure on damage or another tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
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
        "--causal-lm-report=verdict.md",
    )
    result.assert_outcomes(passed=1, failed=1)
    verdict = (pytester.path / "verdict.md").read_text()
    if importlib.util.find_spec("matplotlib"):  # beside the report, shown under the failures
        assert (pytester.path / "verdict.layers.png").stat().st_size > 0
        assert "![hidden-state NMSE per layer against the reference](verdict.layers.png)" in verdict
    assert re.search(r"```text\nlayer +NMSE .*\nembeddings +0 +\|\nlayer 0 +0 +\|\nlayer 1 +\S+ +\|█+\n```", verdict)
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


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize(
    "conversion", [broken.rotary_permutation_forgotten_in_one_layer, broken.norm_weight_shifted_in_one_layer]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_conversion_that_broke_one_layer_names_that_layer(
    qwen3_reference, qwen3_path: Path, conversion, dtype
) -> None:
    _, _, reference = qwen3_reference
    model, tokenizer = conversion(qwen3_path, layer=1, dtype=dtype)
    with pytest.raises(AssertionError) as caught:
        assert_close_to_reference(model, tokenizer, reference)
    message = str(caught.value)
    assert re.search(
        r"first layer whose error jumps\s+: layer 1: hidden-state NMSE [0-9.e-]+, after [0-9.e-]+ at layer 0", message
    )
    assert re.search(r"hidden-state NMSE per layer\s+: embeddings \S+; layer 0 \S+; layer 1 \S+", message)
    assert caught.value.causal_lm_measured["layer_nmse"][2][0] == "layer 1"


def test_the_reference_report_carries_the_conversion_metrics(qwen3_reference) -> None:
    model, tokenizer, reference = qwen3_reference
    same = compare_to_reference(model, tokenizer, reference)
    assert same.kl_p999 < 1e-5 and same.logits_nmse < 1e-10 and same.top_probability_rms < 1e-5
    assert same.perplexity_ratio == 1.0 and same.jump is None
    assert [name for name, _ in same.layer_nmse] == ["embeddings", "layer 0", "layer 1"]
    half = compare_to_reference(copy.deepcopy(model).to(torch.bfloat16), tokenizer, reference)
    assert 0 < half.kl_sem < half.kl_mean and half.kl_median <= half.kl_p99 <= half.kl_p999 <= half.kl_max
    assert 0 < half.logits_nmse < 1e-2 and 0 < half.top_probability_rms < 0.05
    assert half.jump is None and all(0 < value < 1e-3 for _, value in half.layer_nmse[1:])  # rounding grows steadily
    assert {"kl_p999", "kl_sem", "logits_nmse", "perplexity_ratio", "layer_nmse"} <= set(half.as_dict())
    assert "p99.9" in str(half) and "logits NMSE" in str(half)


def test_a_few_broken_positions_fail_on_the_tail_when_the_mean_stays_low() -> None:
    from pytest_causal_lm.checks.reference import DriftReport

    report = DriftReport(
        0.004, 0.01, 0.05, 2.0, 0.97, 0.98, 1.0, perplexity_reference=10.0, perplexity_candidate=10.1, kl_p999=1.5
    )
    from pytest_causal_lm.checks import reference as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "compare_to_reference", lambda *args, **kwargs: report)
        with pytest.raises(AssertionError) as caught:
            assert_close_to_reference(None, None, type("R", (), {"checkpoint": "ref"})())
    message = str(caught.value)
    assert "exceeds 1 threshold(s)" in message and re.search(r"KL p99.9\s+: 1.5 > threshold 0.5", message)


def test_another_model_class_gets_no_layer_table(qwen3_reference, qwen3_path: Path) -> None:
    model, tokenizer, reference = qwen3_reference
    other = dataclasses.replace(reference, architecture="LlamaForCausalLM")
    report = compare_to_reference(model, tokenizer, other)
    assert report.layer_nmse == [] and report.jump is None


def test_the_markdown_verdict_plots_the_per_layer_error_of_a_failing_reference() -> None:
    from pytest_causal_lm.report import Cell, layer_plot

    errors = [["embeddings", 0.0], ["layer 0", 1e-7], ["layer 1", 0.38]]
    plot = layer_plot(errors)
    assert plot[0] == "```text" and plot[-1] == "```"
    bars = [line.split("|")[1] for line in plot[2:-1]]
    assert bars[0] == "" and 0 < len(bars[1]) < len(bars[2]) == 38  # log10(0.38) = -0.42: 38 of 40
    cell = Cell.measured("FAIL", {"figure": ["KL mean", 0.4], "layer_nmse": errors}, "drift")
    assert Cell.from_dict(json.loads(json.dumps(cell.to_dict()))) == cell
