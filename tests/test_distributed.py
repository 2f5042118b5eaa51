"""Models that outgrow one device: tensor parallelism (torchrun, gloo on this CPU), device_map and disk offload."""

from __future__ import annotations

import re
from pathlib import Path

import broken
import pytest

import pytest_causal_lm as clm
from pytest_causal_lm.loading import load
from pytest_causal_lm.targets import Target

needs_tp_styles = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers.distributed.tensor_parallel") is None,
    reason="these broken plans use transformers.distributed.tensor_parallel's styles (transformers 5.1x on)",
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_healthy_checkpoints_give_the_single_process_scores_over_two_processes(tiny_path: Path, dtype: str) -> None:
    result = _tensor_parallel(tiny_path, dtype=dtype)
    if dtype == "float32":
        assert result.greatest_difference < 1e-4
    *parted, setup = result.notes  # half precision may part the continuations at a near-tie: said, not failed
    assert setup == "2 processes, tp_plan='auto', gloo; reference: the session's single-process model on cpu"
    assert dtype != "float32" or not parted
    assert all(note.startswith("greedy continuations part at a near-tie") for note in parted), parted


@needs_tp_styles
def test_tensor_parallel_names_the_rank_and_module_of_a_projection_sharded_along_the_wrong_dimension(
    qwen3_path: Path, tmp_path: Path
) -> None:
    path = broken.q_proj_sharded_along_its_input(qwen3_path, tmp_path / "port")
    with pytest.raises(AssertionError) as caught:
        _tensor_parallel(path)
    message = str(caught.value)
    assert re.match(r"tensor parallelism: the worker failed on rank \d", message)
    assert re.search(r"error\s+: rank \d, in model.layers.0.self_attn.q_proj: RuntimeError: mat1 and mat2", message)


@needs_tp_styles
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tensor_parallel_catches_a_row_parallel_layer_whose_partial_sums_are_never_reduced(
    qwen3_path: Path, tmp_path: Path, dtype: str
) -> None:
    path = broken.o_proj_never_reduced(qwen3_path, tmp_path / "port")
    with pytest.raises(AssertionError) as caught:
        _tensor_parallel(path, dtype=dtype)
    message = str(caught.value)
    assert message.startswith("tensor parallelism: the scores of a prompt differ from the single process's")
    assert re.search(r"greatest \|difference\|\s+: [0-9.e+-]+ at position \d+, score of", message)
    # the workers were started again to replay the prompt with every module recorded: the un-reduced projection
    assert re.search(
        r"first departing module\s+: model.layers.0.self_attn.o_proj \(Linear\): output at position", message
    )
    assert re.search(
        r"modules around it\s+: .*model.layers.0.input_layernorm Δ 0; model.layers.0.self_attn.o_proj", message
    )


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


# --- device_map and offload ------------------------------------------------------------------------------------


def _offloaded(path: Path, dtype: str = "float32") -> clm.CheckResult:
    lm = load(Target(str(path), "cpu", dtype, trust_remote_code=True), seed=0)
    location, kwargs = lm.pretrained_location()
    return clm.assert_device_map_parity(
        lm.model, lm.tokenizer, location=location, from_pretrained_kwargs=kwargs, tolerance=lm.tolerance
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_healthy_checkpoints_give_the_one_device_scores_with_layers_on_disk(tiny_path: Path, dtype: str) -> None:
    result = _offloaded(tiny_path, dtype)
    if dtype == "float32":  # offloading moves weights and computes nothing: at most a kernel's rounding differs
        assert result.greatest_difference < 1e-5  # accelerate 1.15: 0; 1.16: 5e-6 on the tiny Llama
    assert re.fullmatch(
        r"the session's model \(one device\) against a second load \(\d+ on cpu, \d+ on disk\)", result.notes[-1]
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_device_map_parity_names_the_module_of_a_device_read_off_an_offloaded_weight(
    qwen3_path: Path, tmp_path: Path, dtype: str
) -> None:
    with pytest.raises(AssertionError) as caught:
        _offloaded(broken.device_read_off_a_weight(qwen3_path, tmp_path / "port"), dtype)
    message = str(caught.value)
    assert message.startswith("device_map: the model raises in model.rotary_emb once accelerate places its layers")
    assert re.search(r"where\s+: model.rotary_emb, on (disk|cpu)", message)


def test_a_spread_session_model_is_compared_with_a_one_device_load(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-suite=only",
        "--causal-lm-device-map=auto",
        "--causal-lm-max-memory=cpu=90KB",
        "-k",
        "device_map_parity",
        "-v",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*device_map parity ok*the session's model (*on disk) against a second load (one device)*"]
    )


def test_device_map_parity_runs_only_when_asked(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=only", "-k", "parity", "-rs")
    result.stdout.fnmatch_lines(["*device_map parity is opt-in: pass --causal-lm-offload-parity*"])
    asked = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-suite=only",
        "-k",
        "device_map_parity",
        "--causal-lm-offload-parity",
    )
    asked.assert_outcomes(passed=1)


def test_max_memory_must_name_device_and_size(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-max-memory=2GB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid value for max_memory: max_memory entry '2GB' is not DEVICE=SIZE*"])


def test_each_xdist_worker_takes_its_own_gpu_for_a_bare_cuda_device() -> None:
    from pytest_causal_lm.devices import worker_device

    assert [worker_device("cuda", f"gw{k}", 4) for k in range(6)] == [f"cuda:{k % 4}" for k in range(6)]
    assert worker_device("cuda", None, 4) == "cuda"  # no xdist: transformers' default GPU
    assert worker_device("cuda", "gw3", 1) == "cuda"  # one GPU: every worker shares it
    assert worker_device("cuda:1", "gw0", 4) == "cuda:1"  # a device named by the user is kept
    assert worker_device("cpu", "gw1", 4) == "cpu"


def test_a_one_device_reference_that_does_not_fit_is_a_skip_saying_how_much_it_needs(
    healthy: clm.CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    pages = {"SC_AVPHYS_PAGES": 10, "SC_PAGE_SIZE": 4096}  # 40 KiB free
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    reason = clm.checks.single_device_room(healthy.model)
    assert re.fullmatch(r"the one-device model does not fit: its weights need [\d.]+ GiB, 0.0 GiB free", reason)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 10**7, "SC_PAGE_SIZE": 4096}[name])
    assert clm.checks.single_device_room(healthy.model) is None


def test_device_map_parity_without_accelerate_says_what_to_install(
    healthy: clm.CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    with pytest.raises(
        AssertionError, match=r"device_map parity needs the accelerate package(.|\n)*pytest-causal-lm\[offload\]"
    ):
        clm.assert_device_map_parity(healthy.model, healthy.tokenizer, location="unused")


def test_a_checkpoint_too_big_for_one_device_is_compared_with_its_device_map_placement(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-suite=only",
        "--causal-lm-device-map=auto",
        "--causal-lm-max-memory=cpu=90KB",
        "--causal-lm-tensor-parallel=2",
        "-k",
        "tensor_parallel",
        "-v",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*reference: the session's single-process model, spread by device_map over cpu, disk*"]
    )
