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
from dataclasses import dataclass

import pytest

import pytest_causal_lm as clm

# The lists below were verified against this transformers release; another one may add architectures.
VERIFIED_WITH_TRANSFORMERS = "5.23.0"

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
    "arcee",
    "aria_text",
    "axk1",
    "axk2",
    "bailing_hybrid",
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
    "dots1",
    "dots3_note_text",
    "electra",
    "emu3",
    "ernie",
    "ernie4_5",
    "ernie4_5_moe",
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
    "granitemoehybrid",
    "granitemoeshared",
    "helium",
    "hrm_text",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v3",
    "hy_v4",
    "hyperclovax",
    "inkling2_text",
    "inkling_text",
    "internlm3",
    "iquestcoder",
    "jais2",
    "jetmoe",
    "kimi_linear",
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
    "minimax",
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
    "nemotron_h",
    "olmo",
    "olmo2",
    "olmo3",
    "olmo_hybrid",
    "olmoe",
    "openai-gpt",
    "opt",
    "persimmon",
    "phi",
    "phi3",
    "phi4_multimodal",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_5_text",
    "qwen3_moe",
    "qwen3_next",
    "qwen4_exp",
    "qwen4_exp_text",
    "rembert",
    "roc_bert",
    "roformer",
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


@dataclass(frozen=True)
class Discrepancy:
    """Suite tests that fail on this architecture, each with a regex its failure must match, and why."""

    failing: dict[str, str]
    why: str


_POSITIONS_FROM_ZERO = r"likely cause\s+: the forward's default positions are not the ones generate passes"
_ROBERTA_POSITIONS = Discrepancy(
    dict.fromkeys(
        [
            "test_greedy_loop_parity",
            "test_padding_invariance",
            "test_static_cache",
            "test_continuation",
            "test_assisted_decoding",
            "test_inputs_embeds",
        ],
        _POSITIONS_FROM_ZERO,
    ),
    "transformers 5's generate passes position_ids counted from 0; the forward, given none, counts from "
    "padding_idx + 1 (RoBERTa's convention), so generate decodes with other position embeddings than the model",
)
_NO_POSITION_IDS = Discrepancy(
    {"test_padding_invariance": r"likely cause\s+: \w+\.forward does not use position_ids: left padding shifts"},
    "the forward takes no position_ids (learned absolute positions counted from 0), so a left-padded row's tokens "
    "sit at other positions than the prompt alone and batched generation with left padding gives other text; "
    "transformers' own tests skip left padding for these models",
)
KNOWN_DISCREPANCIES: dict[str, Discrepancy] = {
    "ctrl": Discrepancy(
        {"test_inputs_embeds": r"forward\(inputs_embeds=...\) changed the tensor it was given, in place"},
        "CTRLModel scales the caller's inputs_embeds in place (`inputs_embeds *= np.sqrt(d_model_size)`), so a "
        "second call with the same embeddings (a retry, generate after a forward) scales them again",
    ),
    "moshi": Discrepancy(
        {
            "test_long_context": r"long context: cached pass, segment 3 of 6 \(positions 33..33\)",
            "test_continuation": r"generate continued after a new turn",
            "test_assisted_decoding": r"prompt lookup decoding",
        },
        "Moshi's forward masks with create_causal_mask (no window) while its config's sliding_window makes the "
        "DynamicCache keep only the last window - 1 keys: past the window, cached decoding sees fewer tokens than "
        "the full forward (measured from position 33 with a window of 32)",
    ),
    "recurrent_gemma": Discrepancy(
        {"test_attention_implementations": r"'sdpa' differs from 'eager' on a left-padded batch"},
        "its recurrent blocks carry every position, pad tokens included, into the next ones; the attention "
        "blocks give fully masked pad rows other values under eager than under sdpa, so a left-padded row's "
        "real tokens score differently with the two (padding invariance holds under sdpa, the default)",
    ),
    "deepseek_v4": Discrepancy(
        {
            "test_static_cache": r"KeyError: 'heavily_compressed_attention'",
            "test_inputs_embeds": r"'NoneType' object has no attribute 'reshape'",
        },
        "StaticCache has no layer class for DeepSeek-V4's compressed-attention layer types (KeyError instead of "
        "a refusal), and its forward reads input_ids even when given inputs_embeds",
    ),
    **dict.fromkeys(
        ["gemma4", "gemma4_unified"],
        Discrepancy(
            {"test_inputs_embeds": r"IndexError: index out of range in self"},
            "its per-layer embeddings need input_ids; from inputs_embeds alone it recovers them by exact equality "
            "with the scaled embedding rows, which generate(inputs_embeds=...) does not survive",
        ),
    ),
    **dict.fromkeys(
        ["camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod"],
        _ROBERTA_POSITIONS,
    ),
    **dict.fromkeys(
        [
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "mvp",
            "pegasus",
            "plbart",
            "trocr",
        ],
        _NO_POSITION_IDS,
    ),
    "rwkv": Discrepancy(
        {"test_padding_invariance": r"RwkvForCausalLM\.forward uses neither attention_mask nor position_ids"},
        "RWKV's recurrence reads every token, pad tokens included: neither attention_mask nor position_ids reach it",
    ),
    "bamba": Discrepancy(
        {
            "test_kv_cache_parity": r"KV-cache parity violated: decoding step 1 ",
            "test_greedy_loop_parity": r"greedy-loop parity violated",
        },
        "BambaModel.forward, given no position_ids, counts positions from 0 even after a cache, so a cached "
        "step gets the rotary position of token 0 (GraniteMoeHybrid, with the same Mamba mixer, adds the cached length)",
    ),
    "git": Discrepancy(
        {
            "test_kv_cache_parity": r"KV-cache parity violated: left-padded batch",
            "test_padding_invariance": r"padding changes the greedy continuation",
            "test_inputs_embeds": r"forward\(inputs_embeds=...\) changed the tensor it was given, in place",
        },
        "GIT widens a cached step's attention mask by its image-patch count even when no image was given, "
        "so left-padded cached decoding masks the wrong positions; GitEmbeddings adds the position embeddings "
        "to the caller's inputs_embeds in place (`embeddings += ...`), so reusing them adds positions twice",
    ),
    "jamba": Discrepancy(
        {
            "test_kv_cache_parity": r"KV-cache parity violated: chunk 2 of 2",
            "test_continuation": r"generate continued after a new turn",
        },
        "Jamba's torch Mamba path uses the cached SSM state only for one-token steps; a multi-token step after "
        "a cache (chunked prefill, a new chat turn appended to a cached conversation) restarts from a zero state",
    ),
    "reformer": Discrepancy(
        {"test_padding_invariance": r"padding changes the greedy continuation"},
        "Reformer's prepare_inputs_for_generation drops attention_mask and position_ids, so a left-padded "
        "generate reads the pad tokens",
    ),
    "whisper": Discrepancy(
        {
            "test_padding_invariance": r"padding changes the greedy continuation",
            "test_static_cache": r"static cache differs \(left-padded batch of 3\)",
        },
        "WhisperForCausalLM takes position_ids only through **kwargs; generate passes position_ids only to a "
        "forward whose signature names them, so left-padded generation shifts every position",
    ),
    "xlm": Discrepancy(
        {
            "test_greedy_loop_parity": r"greedy-loop parity violated",
            "test_padding_invariance": r"padding changes scores",
        },
        "XLM's generate appends its mask token and predicts there, and its causal attention mask ignores the "
        "padding mask (get_masks), so pad tokens are attended",
    ),
    "xlnet": Discrepancy(
        {
            "test_prefix_causality": r"prefix causality violated",
            "test_greedy_loop_parity": r"greedy-loop parity violated",
            "test_padding_invariance": r"XLNetLMHeadModel\.forward does not use position_ids",
            "test_generation_defaults": r"`max_length` is set to -1",
        },
        "XLNet attends bidirectionally over its input by default (attn_type='bi'), and its generate appends a "
        "dummy token with a permutation mask; a plain generate() without max_new_tokens raises, since its config "
        "reports max_position_embeddings=-1 (no limit) and generate caps its default max_length at that",
    ),
    "prophetnet": Discrepancy(
        {
            "test_prefix_causality": r"prefix causality violated",
            "test_kv_cache_parity": r"KV-cache parity violated",
            "test_greedy_loop_parity": r"greedy-loop parity violated",
            "test_padding_invariance": r"ProphetNetForCausalLM\.forward does not use position_ids",
            "test_static_cache": r"size of tensor a",
            "test_continuation": r"generate continued from its returned past_key_values",
            "test_inputs_embeds": r"generate\(inputs_embeds=...\): step 0",
        },
        "ProphetNetForCausalLM's logits come from its first n-gram predicting stream; run on its own, earlier "
        "positions' scores change when tokens are appended and cached decoding differs (so every cached path "
        "into generate does), and its n-gram attention cannot size a static cache; the leak inside the n-gram "
        "attention is not traced further",
    ),
    "cpmant": Discrepancy(
        {
            "test_output_shapes": r"cache layer 0 keys\s+: shape \(1, \d+, 38, ",
            "test_prefix_causality": r"prefix causality violated",
            "test_kv_cache_parity": r"size of tensor a",
            "test_cache_effectiveness": r"cache not effective",
            "test_greedy_loop_parity": r"size of tensor a",
            "test_padding_invariance": r"CpmAntForCausalLM\.forward uses neither attention_mask nor position_ids",
            "test_static_cache": r"index_copy_\(\): index \d+ is out of bounds",
            "test_continuation": r"generate continued from its returned past_key_values",
            "test_assisted_decoding": r"assisted by itself decoding",
        },
        "CPM-Ant prepends 32 internal prompt positions to every input and to its cache, so cached decoding "
        "cannot line up, and position 0's scores change when the input grows",
    ),
}

# Architectures whose transformers tensor-parallel plan breaks at N=2 on the tiny checkpoints (transformers
# 5.23.0, gloo on CPU): the failure each gives, and why. Every other architecture with a plan passes.
TENSOR_PARALLEL_DISCREPANCIES: dict[str, tuple[str, str]] = {
    "doge": (
        r"in model.layers.0.self_attn.dt_proj: RuntimeError: output with shape .* doesn't match the broadcast shape",
        "the plan shards the attention heads but not the dynamic-mask parameter A that dt_proj's output is "
        "broadcast with, so the local heads meet all heads",
    ),
    "gemma4": (
        r"in model.language_model.embed_tokens: RuntimeError: aten.where.self got mixed torch.Tensor and DTensor",
        "the sharded embedding's DTensor output meets a plain tensor in Gemma 4's per-layer-input lookup",
    ),
    "hrm_text": (
        r"the scores of a prompt differ from the single process's",
        "every position's scores differ (up to 0.99): its recurrent high/low-level modules run a layer whose "
        "sharded output is not gathered back; the plan does not fit the model",
    ),
    "inkling_text": (
        r"in model.embed_tokens.embed_norm: AssertionError",
        "the embedding norm asserts on the shape of the sharded embedding output",
    ),
    "lfm2": (
        r"in lm_head: RuntimeError: narrow unexpectedly changed concrete size",
        "the gathered head's output is narrowed to the vocabulary twice (768 -> 384 on a 384-token vocabulary)",
    ),
    "lfm3": (
        r"in lm_head: RuntimeError: narrow unexpectedly changed concrete size",
        "the same head gather as lfm2",
    ),
}

NOT_BUILDABLE: dict[str, str] = {
    "blt": r"96,268,416 parameters",  # byte patcher, local encoder/decoder and global model keep their sizes
    "dbrx": r"has no attribute 'rope_theta'",  # the attention reads it from a sub-config that lacks it
    "dots3_note": r"per_layer_config. keys must be integer layer indices",  # default per-layer settings for layer 25+
    "gemma3n": r"ImportError",  # its vision tower needs timm, not a dependency
    "gemma4_assistant": r"validate_architecture",  # its default config fails it: hidden_size_per_layer_input must be 0
    "gemma4_unified_assistant": r"layer types producing a cache is different",
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
    expected = KNOWN_DISCREPANCIES[name].failing
    reports = _suite_reports(pytester, [name])
    failed = {r.nodeid.split("::")[-1].split("[")[0]: r.longreprtext for r in reports if r.failed}
    assert set(failed) == set(expected)
    for test, pattern in expected.items():
        assert re.search(pattern, failed[test]), f"{test}: {failed[test][-1500:]}"
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
    expected = {name for name in names if name in TENSOR_PARALLEL_DISCREPANCIES}
    assert set(failed) == expected, (sorted(set(failed) - expected), sorted(expected - set(failed)))
    for name, text in failed.items():
        assert re.search(TENSOR_PARALLEL_DISCREPANCIES[name][0], text), f"{name}: {text[-800:]}"
    unexpected = sorted({why for r in reports if r.skipped and (why := _unexpected_skip(r))})
    assert not unexpected, unexpected
