"""Models that outgrow one device: tensor parallelism (torchrun, gloo on this CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest

import pytest_causal_lm as clm
from pytest_causal_lm.loading import Target, load

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers.distributed.tensor_parallel") is None,
    reason="these broken plans register a style in transformers.distributed.tensor_parallel (transformers >= 5.1x)",
)


def _tensor_parallel(path: Path, processes: int = 2, dtype: str = "float32") -> clm.CheckResult:
    lm = load(Target(str(path), "cpu", dtype, trust_remote_code=True), seed=0)
    location, kwargs = lm.pretrained_location()
    return clm.assert_tensor_parallel_matches(
        lm.model,
        lm.tokenizer,
        processes=processes,
        location=location,
        from_pretrained_kwargs=kwargs,
        tolerance=lm.tolerance,
    )


def test_healthy_checkpoints_give_the_single_process_scores_over_two_processes(tiny_path: Path) -> None:
    result = _tensor_parallel(tiny_path)
    assert result.greatest_difference < 1e-4
    assert result.notes == ["2 processes, tp_plan='auto', gloo; reference: the session's single-process model"]


def test_tensor_parallel_names_the_rank_and_module_of_a_projection_sharded_along_the_wrong_dimension(
    qwen3_path: Path, tmp_path: Path
) -> None:
    path = broken.q_proj_sharded_along_its_input(qwen3_path, tmp_path / "port")
    with pytest.raises(AssertionError) as caught:
        _tensor_parallel(path)
    message = str(caught.value)
    assert re.match(r"tensor parallelism: the worker failed on rank \d", message)
    assert re.search(r"error\s+: rank \d, in model.layers.0.self_attn.q_proj: RuntimeError: mat1 and mat2", message)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensor_parallel_catches_a_row_parallel_layer_whose_partial_sums_are_never_reduced(
    qwen3_path: Path, tmp_path: Path, dtype: str
) -> None:
    path = broken.o_proj_never_reduced(qwen3_path, tmp_path / "port")
    with pytest.raises(AssertionError) as caught:
        _tensor_parallel(path, dtype=dtype)
    message = str(caught.value)
    assert message.startswith("tensor parallelism: the scores of a prompt differ from the single process's")
    assert re.search(r"greatest \|difference\|\s+: [0-9.e+-]+ at position \d+, score of", message)


def test_tensor_parallel_skips_a_process_count_that_does_not_divide_the_heads(healthy: clm.CausalLM) -> None:
    with pytest.raises(pytest.skip.Exception, match=r"num_attention_heads=4 does not divide over 3"):
        clm.assert_tensor_parallel_matches(healthy.model, healthy.tokenizer, processes=3, location="unused")


def test_the_suite_runs_tensor_parallelism_only_when_asked(pytester: pytest.Pytester) -> None:
    off = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=only", "-k", "tensor_parallel", "-rs"
    )
    off.stdout.fnmatch_lines(["*tensor parallelism is opt-in: pass --causal-lm-tensor-parallel=N*"])
    on = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-suite=only",
        "-k",
        "tensor_parallel",
        "--causal-lm-tensor-parallel=2",
    )
    on.assert_outcomes(passed=1)
