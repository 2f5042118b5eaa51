"""The built-in suite on tiny random checkpoints of every transformers causal-LM architecture.

Every model_type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is in exactly one list:

- VERIFIED: every invariant passes or skips for an allowed reason (no false failures);
- KNOWN_DISCREPANCIES: the suite fails exactly the named invariants, with the
  named message, because transformers' implementation really behaves that way;
- NOT_BUILDABLE: the tiny builder cannot make a faithful small checkpoint.

A quick set runs by default; the full matrix runs with `pytest -m architecture_matrix`.
docs/breadth.md lists the architectures and the skips.
"""

from __future__ import annotations

import re

import pytest

import pytest_causal_lm as clm
from pytest_causal_lm.known_issues import (
    KNOWN_DISCREPANCIES,
    LINEAR_ATTENTION_CROP_MODELS,
    TENSOR_PARALLEL_DISCREPANCIES,
)

# The lists below were verified against this transformers release; another one may add architectures.
VERIFIED_WITH_TRANSFORMERS = "5.25.0"

QUICK = [
    "gpt2",
    "mistral",
    "gemma2",
    "phi3",
    "bloom",
    "mamba",
    "mixtral",
    "gpt_neox",
    "opt",
    "starcoder2",
    "deepseek_v3",
    "biogpt",
]

VERIFIED = [
    "afmoe",
    "apertus",
    "apertus1p5_text",
    "arcee",
    "aria_text",
    "axk1",
    "axk2",
    "beam",
    "bert",
    "bert-generation",
    "big_bird",
    "biogpt",
    "bitnet",
    "bloom",
    "codegen",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "cohere_compass_text",
    "cwm",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "diffllama",
    "doge",
    "dory",
    "dots1",
    "dots3_note_text",
    "electra",
    "emu3",
    "ergo",
    "ernie",
    "ernie4_5",
    "ernie4_5_moe",
    "exaone",
    "exaone4",
    "exaone_moe",
    "falcon",
    "falcon_h1",
    "falcon_mamba",
    "flex_olmo",
    "flint",
    "fuyu",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gemma3n_text",
    "gemma4_text",
    "gemma4_unified_text",
    "glm",
    "glm4",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "got_ocr2",
    "gpt-sw3",
    "gpt2",
    "gpt_bigcode",
    "gpt_neo",
    "gpt_neox",
    "gpt_neox_japanese",
    "gpt_oss",
    "gptj",
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoeshared",
    "helium",
    "hrm_text",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v3",
    "hy_v4",
    "hyperclovax",
    "inkling2_loop_text",
    "inkling2_text",
    "inkling_text",
    "internlm3",
    "iquestcoder",
    "jais2",
    "jetmoe",
    "kolibri1",
    "laguna",
    "lfm2",
    "lfm2_moe",
    "lfm3",
    "llama",
    "llama4",
    "llama4_text",
    "longcat_flash",
    "mamba",
    "mamba2",
    "megatron-bert",
    "mellum",
    "mimo_v2_flash",
    "minicpm3",
    "minicpm5_moe",
    "minimax_m2",
    "minimax_m3_vl_text",
    "ministral",
    "ministral3",
    "mistral",
    "mixtral",
    "mllama",
    "modernbert-decoder",
    "moss_transcribe_diarize",
    "mpt",
    "nanochat",
    "nemotron",
    "olmo",
    "olmo2",
    "olmo3",
    "olmoe",
    "openai-gpt",
    "opt",
    "param2moe",
    "persimmon",
    "phi",
    "phi3",
    "phi4_multimodal",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "rembert",
    "roc_bert",
    "roformer",
    "sarvam_mla",
    "sarvam_moe",
    "seed_oss",
    "smollm3",
    "solar_open",
    "stablelm",
    "starcoder2",
    "vaultgemma",
    "xglm",
    "youtu",
    "zamba",
    "zaya",
]


NOT_BUILDABLE: dict[str, str] = {
    "blt": r"96,268,416 parameters",  # byte patcher, local encoder/decoder and global model keep their sizes
    "dbrx": r"has no attribute 'rope_theta'",  # the attention reads it from a sub-config that lacks it
    "dots3_note": r"per_layer_config. keys must be integer layer indices",  # default per-layer settings for layer 25+
    "gemma3n": r"ImportError",  # its vision tower needs timm, not a dependency
    "gemma4_assistant": r"validate_architecture",  # its default config fails it: hidden_size_per_layer_input must be 0
    # a drafter for a target model: its forward needs the target's shared key/value states
    "gemma4_unified_assistant": r"inputs_embeds and shared_kv_states cannot be None",
    # its validator ties per-layer patterns (layer_types, kv_source_layers, index_layers) to the full depth and asks
    # for a head_dim that is a multiple of 16 (NVFP4 keys)
    "kolibri1_1": r"validate_architecture",
    "musicgen": r"has no attribute 'dropout'",  # composite text-encoder/audio/decoder config; decoder reads codebooks
    "musicgen_melody": r"has no attribute 'dropout'",
    "xlstm": r"forward fails: ValueError: matC_old has wrong shape",  # the chunkwise mLSTM kernel
    "zamba2": r"validate_layer_type",  # its fixed 54-layer default pattern
}


def _unexpected_skip(report: pytest.TestReport) -> str | None:
    """A skip reason the registry does not list for that invariant, or None when it is allowed."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    test = report.nodeid.split("::")[-1].split("[")[0]
    invariant = clm.invariant_for_test(test)
    if invariant is None:
        return None if "benchmarks are opt-in" in reason else f"{test}: {reason}"
    if invariant.opt_in is not None or any(re.search(pattern, reason) for pattern in invariant.healthy_skips):
        return None
    return f"{test}: {reason}"


def _suite_reports(pytester: pytest.Pytester, architectures: list[str]) -> list[pytest.TestReport]:
    args = [f"--causal-lm-checkpoint=tiny:{name}" for name in architectures]
    result = pytester.runpytest(*args, "--causal-lm-suite=only", "-p", "no:cacheprovider", "-rs")
    return result.reprec.getreports("pytest_runtest_logreport")


def _run_suite(pytester: pytest.Pytester, architectures: list[str]) -> None:
    reports = _suite_reports(pytester, architectures)
    failures = [f"{r.nodeid}: {r.longreprtext.splitlines()[-1] if r.longreprtext else ''}" for r in reports if r.failed]
    assert not failures, "\n".join(failures)
    unexpected = sorted({why for r in reports if r.skipped and (why := _unexpected_skip(r))})
    assert not unexpected, unexpected
    assert sum(1 for r in reports if r.passed and r.when == "call") >= 9 * len(architectures)


def test_every_causal_lm_architecture_is_verified_or_explained() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if transformers.__version__ != VERIFIED_WITH_TRANSFORMERS:
        pytest.skip(
            f"the architecture lists were verified against transformers {VERIFIED_WITH_TRANSFORMERS}, "
            f"this is {transformers.__version__}: run scripts/architecture_sweep.py and update them"
        )
    listed = [*VERIFIED, *KNOWN_DISCREPANCIES, *NOT_BUILDABLE]
    assert len(listed) == len(set(listed)), sorted({name for name in listed if listed.count(name) > 1})
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(listed))
    assert not missing, f"not verified or explained yet: {missing} (python scripts/architecture_sweep.py NAME)"
    assert not set(listed) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_quick_architecture_set_passes_the_built_in_suite(pytester: pytest.Pytester) -> None:
    _run_suite(pytester, QUICK)


@pytest.mark.architecture_matrix
@pytest.mark.parametrize("chunk", range(0, len(VERIFIED), 12), ids=lambda start: f"{VERIFIED[start]}..")
def test_every_verified_architecture_passes_the_built_in_suite(pytester: pytest.Pytester, chunk: int) -> None:
    _run_suite(pytester, VERIFIED[chunk : chunk + 12])


@pytest.mark.architecture_matrix
@pytest.mark.parametrize("name", sorted(KNOWN_DISCREPANCIES))
def test_known_discrepancies_fail_exactly_the_named_invariants(pytester: pytest.Pytester, name: str) -> None:
    import transformers

    known = KNOWN_DISCREPANCIES[name]
    if not known.applies_to(transformers.__version__):
        pytest.skip(f"{name}'s discrepancy is one of transformers {known.transformers}")
    expected = {f"test_{key}": pattern for key, pattern in known.failing.items()}
    reports = _suite_reports(pytester, [name])
    failed = {r.nodeid.split("::")[-1].split("[")[0]: r for r in reports if r.failed}
    assert set(failed) == set(expected)
    for test, pattern in expected.items():
        text = failed[test].longreprtext
        assert re.search(pattern, text), f"{test}: {text[-1500:]}"
        said = "\n".join(section for name, section in failed[test].sections if name == "causal-lm")
        assert "a transformers bug or design, not your checkpoint" in said, said
    unexpected = sorted({why for r in reports if r.skipped and (why := _unexpected_skip(r))})
    assert not unexpected, unexpected


@pytest.mark.architecture_matrix
@pytest.mark.parametrize("name", sorted(NOT_BUILDABLE))
def test_unbuildable_architectures_fail_to_build_for_the_stated_reason(name: str, tmp_path) -> None:
    from pytest_causal_lm.tiny import TinyBuildError, write_tiny_checkpoint

    with pytest.raises(TinyBuildError, match=NOT_BUILDABLE[name]):
        write_tiny_checkpoint(name, tmp_path)


def test_tiny_builder_refuses_a_model_over_the_parameter_limit(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pytest_causal_lm import tiny

    monkeypatch.setattr(tiny, "MAX_TINY_PARAMETERS", 1_000)
    with pytest.raises(tiny.TinyBuildError, match=r"gpt2: [\d,]+ parameters after shrinking \(limit 1,000\)"):
        tiny.write_tiny_checkpoint("gpt2", tmp_path)


def test_tiny_builder_refuses_a_checkpoint_that_does_not_load_back_as_built(tmp_path) -> None:
    import torch

    from pytest_causal_lm import tiny

    tokenizer = tiny._train_tokenizer(tiny.TINY_VARIANTS["qwen3"])
    model, config = tiny._build_any_architecture("gpt2", tokenizer)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # what from_pretrained restores is no longer what was built
    with pytest.raises(tiny.TinyBuildError, match=r"gpt2: the saved checkpoint does not load back .*logits differ by"):
        tiny._save_loadable_config("gpt2", model, config, tmp_path)


@pytest.mark.architecture_matrix
@pytest.mark.parametrize("chunk", range(0, len(VERIFIED) + len(KNOWN_DISCREPANCIES), 30))
def test_tensor_parallelism_passes_every_architecture_with_a_plan_but_the_pinned_ones(
    pytester: pytest.Pytester, chunk: int
) -> None:
    names = [*VERIFIED, *KNOWN_DISCREPANCIES][chunk : chunk + 30]
    args = [f"--causal-lm-checkpoint=tiny:{name}" for name in names]
    result = pytester.runpytest(
        *args,
        "--causal-lm-suite=only",
        "--causal-lm-tensor-parallel=2",
        "-k",
        "tensor_parallel",
        "-p",
        "no:cacheprovider",
    )
    reports = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call" or r.skipped]
    failed = {r.nodeid.split("[tiny-")[1].removesuffix("-cpu-float32]"): r.longreprtext for r in reports if r.failed}
    import transformers

    pinned = {
        name: known
        for name, known in TENSOR_PARALLEL_DISCREPANCIES.items()
        if known.applies_to(transformers.__version__)
    }
    expected = {name for name in names if name in pinned}
    assert set(failed) == expected, (sorted(set(failed) - expected), sorted(expected - set(failed)))
    for name, text in failed.items():
        assert re.search(TENSOR_PARALLEL_DISCREPANCIES[name].failing["tensor_parallel"], text), f"{name}: {text[-800:]}"
    unexpected = sorted({why for r in reports if r.skipped and (why := _unexpected_skip(r))})
    assert not unexpected, unexpected


@pytest.mark.parametrize("name", LINEAR_ATTENTION_CROP_MODELS)
def test_the_pinned_linear_attention_crop_bug_reproduces_with_transformers_alone(tiny_cache, name: str) -> None:
    """The evidence behind the linear-attention crop entries of KNOWN_DISCREPANCIES, without any check of this
    suite: on the versions the entry names, prompt lookup's step scores differ from one forward over the same
    tokens; elsewhere transformers refuses the path or the two agree. A release that fixes it fails here, and the
    entry's range moves."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pytest_causal_lm.checks.generation import REPEATING_TEXT
    from pytest_causal_lm.tiny import TinyBuildError, materialize

    if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    known = KNOWN_DISCREPANCIES[name]
    try:
        path = materialize(f"tiny:{name}")
    except TinyBuildError as error:  # the tiny recipe follows the pinned release's config names
        if known.applies_to(transformers.__version__):
            raise
        pytest.skip(f"tiny:{name} does not build on transformers {transformers.__version__}: {error}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(REPEATING_TEXT, return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                prompt_lookup_num_tokens=3,
                max_new_tokens=8,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
    except ValueError as refused:  # before 5.25: "assisted generation is not supported with stateful models"
        assert not known.applies_to(transformers.__version__), refused
        return
    steps = torch.stack(out.logits, dim=1)[0]
    with torch.no_grad():
        forward = model(out.sequences).logits[0, ids.shape[1] - 1 : ids.shape[1] - 1 + steps.shape[0]]
    difference = float((steps - forward).abs().max())
    # float32's table tolerance: a healthy step differs by about 1e-6 here (nemotron_h's bug: 4.5e-4, qwen3_next's: 2.25)
    assert (difference > 1e-4) == known.applies_to(transformers.__version__), difference


def test_a_known_transformers_bug_is_named_as_one_in_the_failure_and_the_markdown_verdict(
    pytester: pytest.Pytester,
) -> None:
    import transformers

    if not KNOWN_DISCREPANCIES["qwen3_next"].applies_to(transformers.__version__):
        pytest.skip(f"qwen3_next's pinned discrepancy is not one of transformers {transformers.__version__}")
    args = ("--causal-lm-checkpoint=tiny:qwen3_next", "--causal-lm-suite=only", "-k", "assisted_decoding")
    result = pytester.runpytest(*args, "--causal-lm-report=verdict.md", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    said = "a transformers bug or design, not your checkpoint (qwen3_next on transformers"
    result.stdout.fnmatch_lines([f"*{said}*--causal-lm-known-limitations=assisted_decoding*"])
    failures = (pytester.path / "verdict.md").read_text().split("### Failures")[1]
    assert "assisted decoding: ❌ FAIL" in failures and said in failures, failures


@pytest.mark.parametrize(("name", "pinned"), [("qwen3", False), ("minimax", True), ("recurrent_gemma", True)])
def test_the_pinned_beam_search_reorder_bugs_reproduce_with_transformers_alone(
    tiny_cache, name: str, pinned: bool
) -> None:
    """The evidence behind the beam search entries for MiniMax and RecurrentGemma, without any check of this suite:
    four beams with the cache score their sequences otherwise than without it (states the reorder misses); a
    model whose cache is reordered whole (Qwen3) agrees. A release that fixes one fails here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_causal_lm.tiny import materialize

    path = materialize(f"tiny:{name}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)("Hi dog how are you?", return_tensors="pt")["input_ids"]
    scores = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                num_beams=4,
                num_return_sequences=4,
                max_new_tokens=8,
                do_sample=False,
                use_cache=use_cache,
                return_dict_in_generate=True,
                output_scores=True,
            )
        scores.append(out.sequences_scores)
    difference = float((scores[0] - scores[1]).abs().max())
    assert (difference > 1e-3) is pinned, difference
