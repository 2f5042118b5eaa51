"""Beyond the short-prompt corner: long context, attention implementations, static cache, inputs_embeds,
continuation and assisted decoding. Healthy checkpoints pass; each broken model fails the invariant meant
for it, with position, token and difference, and every other one it trips is named with the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import broken
import pytest
import torch
from conftest import failure_of
from transformers import AutoConfig

import pytest_causal_lm as clm
from pytest_causal_lm.checks.context import context_boundaries
from pytest_causal_lm.tiny import materialize, write_tiny_checkpoint

NEW_CHECKS = {
    "long": clm.assert_long_context_consistent,
    "pref": clm.assert_long_prefill_consistent,
    "attn": clm.assert_attention_implementations_agree,
    "stat": clm.assert_static_cache_matches,
    "emb": clm.assert_inputs_embeds_match,
    "cont": clm.assert_continuation_matches,
    "asst": clm.assert_assisted_decoding_matches,
    "keep": clm.assert_logits_to_keep,
    "kv": clm.assert_kv_cache_parity,
    "caus": clm.assert_prefix_causal,
    "grdy": clm.assert_greedy_parity,
    "pad": clm.assert_padding_invariant,
    "beam": clm.assert_beam_search_consistent,
    "smp": clm.assert_sampling_consistent,
    "pack": clm.assert_packed_sequences_consistent,
}


@pytest.fixture(scope="session")
def granite_path(tiny_cache: Path) -> Path:
    """Granite scales attention by attention_multiplier, not 1/sqrt(head_dim)."""
    return materialize("tiny:granite")


@pytest.fixture(scope="session")
def mistral_window_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral whose sliding window (32) the long-context check crosses in 72 tokens."""
    path = write_tiny_checkpoint("mistral", tmp_path_factory.mktemp("mistral") / "mistral")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 32}))
    return path


def _outcomes(model, tokenizer) -> dict[str, str]:
    """Each check's outcome on one model: ok, skip or FAIL."""
    outcomes = {}
    for column, check in NEW_CHECKS.items():
        try:
            check(model, tokenizer)
            outcomes[column] = "ok"
        except AssertionError:
            outcomes[column] = "FAIL"
        except pytest.skip.Exception:
            outcomes[column] = "skip"
    return outcomes


def test_healthy_tiny_checkpoints_pass_the_new_invariants(healthy: clm.CausalLM) -> None:
    model, tokenizer = healthy.model, healthy.tokenizer
    for check in (
        clm.assert_attention_implementations_agree,
        clm.assert_static_cache_matches,
        clm.assert_inputs_embeds_match,
        clm.assert_continuation_matches,
        clm.assert_assisted_decoding_matches,
    ):
        result = check(model, tokenizer)
        assert result.greatest_difference < 1e-4, str(result)
        assert result.greatest_difference > 0 or check is clm.assert_inputs_embeds_match  # really compared


def test_a_healthy_sliding_window_passes_the_long_context_check(mistral_window_path: Path) -> None:
    model, tokenizer = broken.load_healthy(mistral_window_path)
    result = clm.assert_long_context_consistent(model, tokenizer)
    assert "72 tokens across sliding window 32" in str(result)
    assert 0 < result.greatest_difference < 1e-4


def test_the_long_context_budget_skips_with_the_option_named(mistral_window_path: Path) -> None:
    model, tokenizer = broken.load_healthy(mistral_window_path)
    with pytest.raises(pytest.skip.Exception, match=r"beyond the cap of 30 .*--causal-lm-long-context-tokens"):
        clm.assert_long_context_consistent(model, tokenizer, budget=30)


def test_healthy_tiny_checkpoints_pass_the_long_prefill(healthy: clm.CausalLM) -> None:
    result = clm.assert_long_prefill_consistent(healthy.model, healthy.tokenizer)
    assert 0 < result.greatest_difference < 1e-4, str(result)
    # max_position_embeddings 512 caps the default 1024 tokens
    assert "512 tokens in one forward (capped by max_position_embeddings 512)" in str(result)
    assert "chunked pass: chunks of 129 tokens, then 3 single steps" in str(result)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_long_prefill_catches_a_tiled_prompt_path_past_256_tokens(llama_path: Path, dtype: str) -> None:
    message = failure_of(
        clm.assert_long_prefill_consistent, broken.tiled_prefill_offset_forgotten(llama_path), getattr(torch, dtype)
    )
    # the second tile of the one-shot forward starts at 128; the first chunk (129 tokens, no cache) is right
    assert message.startswith(
        "long prefill: cached pass, segment 1 of 7 (positions 0..128) differs from the full forward from position "
        "128 (token "
    ), message
    assert "the first segment is a forward of its own, with no cache yet" in message
    assert re.search(r"greatest \|difference\|\s+: [0-9.]+ at position 128, score of", message)
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(LlamaAttention\)", message)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_long_prefill_catches_split_key_decoding_past_256_keys(llama_path: Path, dtype: str) -> None:
    built = broken.split_keys_decode_without_rescale(llama_path)
    message = failure_of(clm.assert_long_prefill_consistent, built, getattr(torch, dtype))
    # the first single step after 509 tokens of chunks: the chunks' queries are longer than one token
    assert message.startswith("long prefill: cached pass, segment 5 of 7 (positions 509..509)"), message
    assert "no cache yet" not in message
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(LlamaAttention\)", message)


def test_long_prefill_catches_a_mask_that_leaks_the_next_token(llama_path: Path) -> None:
    model, tokenizer = broken.leaky_mask(llama_path)
    with pytest.raises(AssertionError, match=r"long prefill: ") as caught:
        clm.assert_long_prefill_consistent(model, tokenizer)
    # a chunk's last position has no next token to peek at, unlike the same position in the full forward
    assert "segment 1 of 7 (positions 0..128) differs from the full forward from position 128" in str(caught.value)


def test_long_prefill_length_option_and_defaults(llama_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_causal_lm.checks import context

    model, tokenizer = broken.load_healthy(llama_path)
    assert "300 tokens in one forward; prefixes of" in str(
        clm.assert_long_prefill_consistent(model, tokenizer, tokens=300)
    )
    with pytest.raises(pytest.skip.Exception, match=r"long prefill: --causal-lm-long-prefill-tokens=0"):
        clm.assert_long_prefill_consistent(model, tokenizer, tokens=0)
    with pytest.raises(pytest.skip.Exception, match=r"max_position_embeddings 200 leaves no long prompt"):
        model.config.max_position_embeddings = 200
        clm.assert_long_prefill_consistent(model, tokenizer)
    monkeypatch.setattr(context, "CPU_PREFILL_PARAMETERS", 1000)
    with pytest.raises(pytest.skip.Exception, match=r"off by default on CPU .*--causal-lm-long-prefill-tokens=1024"):
        clm.assert_long_prefill_consistent(model, tokenizer)


def test_long_prefill_widens_atol_only_for_a_state_carried_along_the_sequence(llama_path: Path) -> None:
    # one forward runs the chunked gated-delta scan, the cached pass another split of it: float32 rounding of the
    # state (8.5e-5 at 512 tokens here, 1.3e-4 on qwen4_exp, over the table's 1e-4)
    model, tokenizer = broken.load_healthy(materialize("tiny:qwen3_next"))
    try:
        clm.assert_kv_cache_parity(model, tokenizer)
    except AssertionError:
        # transformers 5.0's Qwen3-Next restarts its gated-delta state on a multi-token step after a cache: KV-cache
        # parity's chunked prefill fails, and the long prefill's second chunk must fail far beyond any widening
        with pytest.raises(AssertionError, match=r"segment 2 of 7 .*\n(.*\n)*.*linear_attn \(Qwen3NextGatedDeltaNet\)"):
            clm.assert_long_prefill_consistent(model, tokenizer)
        return
    result = clm.assert_long_prefill_consistent(model, tokenizer)
    assert "atol + 0.0003 for the rounding of a recurrent/linear-attention state" in str(result)
    assert 1e-5 < result.greatest_difference < 1e-4 + 3e-4
    model, tokenizer = broken.load_healthy(llama_path)
    assert "rounding of a recurrent" not in str(clm.assert_long_prefill_consistent(model, tokenizer))


def test_long_prefill_stops_below_a_rope_type_that_switches_per_call(llama_path: Path) -> None:
    model, tokenizer = broken.longrope_switches_per_call(llama_path, original=320)
    result = clm.assert_long_prefill_consistent(model, tokenizer)
    assert "320 tokens in one forward (capped by RoPE longrope original context 320)" in str(result)


@pytest.mark.parametrize(
    ("model_type", "edit", "expected"),
    [
        ("mistral", {"sliding_window": 4096}, ["sliding window 4096"]),
        ("qwen2", {"sliding_window": 64, "use_sliding_window": False}, []),
        ("gemma3_text", {"sliding_window": 16}, ["sliding window 16"]),
        ("llama", {}, []),
        (
            "phi3",
            {
                "max_position_embeddings": 4096,
                "original_max_position_embeddings": 256,  # Phi-3 keeps it at the top level too
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 48,  # one per rotary pair of its 96-wide heads
                    "long_factor": [2.0] * 48,
                    "original_max_position_embeddings": 256,
                },
            },
            ["RoPE longrope original context 256"],
        ),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
            ["RoPE dynamic original context 2048"],
        ),
        ("llama4_text", {"attention_chunk_size": 64}, ["attention chunk 64"]),
    ],
)
def test_context_boundaries_come_from_the_config(model_type: str, edit: dict, expected: list[str]) -> None:
    config = AutoConfig.for_model(model_type, **edit)
    assert [b.name for b in context_boundaries(config)] == expected


def test_long_context_catches_a_rope_scaling_that_switches_per_call(llama_path: Path) -> None:
    model, tokenizer = broken.longrope_switches_per_call(llama_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_long_context_consistent(model, tokenizer)
    message = str(caught.value)
    assert re.search(r"cached pass, segment 1 of \d+ .* from position \d+ \(token '.*' \(id \d+\)\)", message)
    assert "RoPE longrope original context 64: this RoPE type picks its frequencies from each call's length" in message
    assert re.search(r"greatest \|difference\|\s+: [0-9.]+ at position \d+", message)
    # the cached pass and the full forward ask the rotary embedding for different frequencies
    assert re.search(r"first departing module\s+: model.rotary_emb \(\w+RotaryEmbedding\)", message)


def test_attention_implementations_catch_a_kernel_that_forgets_the_scale(granite_path: Path) -> None:
    model, tokenizer = broken.sdpa_forgets_the_scale(granite_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_attention_implementations_agree(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("attention implementation 'sdpa_without_scale' differs from 'eager'")
    assert re.search(r"greatest \|difference\|\s+: [0-9.]+ at position \d+, score of '.*' \(id \d+\)", message)
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(GraniteAttention\)", message)
    assert model.config._attn_implementation == "sdpa_without_scale"  # switched back after the check


def test_a_model_that_cannot_switch_implementations_is_not_compared_with_itself(gpt_neo_path: Path) -> None:
    # GPT-Neo predates AttentionInterface: set_attn_implementation("sdpa") logs a warning and keeps eager, so a
    # comparison that trusted the call compared eager with eager and passed
    model, tokenizer = broken.load_healthy(gpt_neo_path)
    with pytest.raises(pytest.skip.Exception) as skipped:
        clm.assert_attention_implementations_agree(model, tokenizer)
    assert "only eager can run here" in str(skipped.value)
    assert "sdpa (GPTNeoForCausalLM keeps eager: it cannot switch its attention implementation after loading)" in str(
        skipped.value
    )


def test_attention_implementations_say_which_were_compared(granite_path: Path) -> None:
    model, tokenizer = broken.load_healthy(granite_path)
    result = clm.assert_attention_implementations_agree(model, tokenizer)
    assert "compared with eager: sdpa (loaded: sdpa)" in str(result)
    assert "flex_attention (compiles its kernel" in str(result)


def test_static_cache_catches_a_cache_reused_without_resetting_its_write_position(llama_path: Path) -> None:
    model, tokenizer = broken.static_cache_reused_without_reset(llama_path)
    with pytest.raises(AssertionError, match=r"static cache differs \(second call, longer prompt\): step 0 of row 0"):
        clm.assert_static_cache_matches(model, tokenizer)


def test_static_cache_under_compile(qwen3_path: Path) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    result = clm.assert_static_cache_matches(model, tokenizer, compile=True)
    assert "compile on" in str(result) and result.greatest_difference < 1e-4


def test_inputs_embeds_catches_an_embedding_scale_on_the_ids_path_only(llama_path: Path) -> None:
    model, tokenizer = broken.embedding_scale_on_ids_only(llama_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_inputs_embeds_match(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("forward(inputs_embeds=get_input_embeddings()(ids)) differs from forward(input_ids=ids)")
    assert "embedding scale" in message and re.search(r"at position \d+, score of", message)


def test_continuation_catches_a_new_turn_cut_to_its_last_token(llama_path: Path) -> None:
    model, tokenizer = broken.cached_steps_feed_one_token(llama_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_continuation_matches(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("generate continued after a new turn")  # continuing by one token still works
    assert re.search(r"at step \d+, score of '.*' \(id \d+\): expected", message)


def test_assisted_decoding_catches_a_cache_crop_that_misses_a_layer(llama_path: Path) -> None:
    model, tokenizer = broken.cache_crop_skips_a_layer(llama_path)
    with pytest.raises(AssertionError, match=r"(assisted by itself|prompt lookup) decoding: step \d+ of row 0"):
        clm.assert_assisted_decoding_matches(model, tokenizer)


def test_logits_to_keep_catches_a_head_that_keeps_one_row_whatever_it_is_asked(llama_path: Path) -> None:
    model, tokenizer = broken.logits_to_keep_as_a_flag(llama_path)
    with pytest.raises(AssertionError, match=r"logits_to_keep=3 did not return the last 3 position\(s\)"):
        clm.assert_logits_to_keep(model, tokenizer)


# A port's own error on a path users take: only transformers' refusal of the path skips, so each is a failure
# that names the error, the module it came from and the line that raised it.
PORT_ERRORS = {
    "static_cache_slot_reserved": (
        clm.assert_static_cache_matches,
        r"static-cache generation",
        r"model\.layers\.0\.self_attn \(LlamaAttention\)",
    ),
    "inputs_embeds_with_positions_given": (
        clm.assert_inputs_embeds_match,
        r"generation from inputs_embeds",
        r"model \(LlamaModel\)",
    ),
    # the first path that crops: transformers 5.0's assisted-by-itself run keeps every proposal, later ones crop too
    "cache_crop_with_a_sign_bug": (
        clm.assert_assisted_decoding_matches,
        r"(assisted by itself|prompt lookup) decoding",
        None,
    ),
}


@pytest.mark.parametrize("error", [ValueError, IndexError], ids=lambda e: e.__name__)
@pytest.mark.parametrize("name", sorted(PORT_ERRORS))
def test_a_ports_error_on_a_generation_path_fails_naming_it_instead_of_skipping(
    name: str, error: type[Exception], llama_path: Path
) -> None:
    check, path, module = PORT_ERRORS[name]
    model, tokenizer = getattr(broken, name)(llama_path, error=error)
    with pytest.raises(AssertionError) as caught:
        check(model, tokenizer)
    message = str(caught.value)
    assert re.match(rf"{path} raised {error.__name__}: ", message), message
    assert re.search(r"raised at\s+: .*broken\.py:\d+ in ", message), message
    if module is not None:  # the forward the error came from, by qualified name and class
        assert re.search(rf"in module\s+: {module}\n", message), message
    assert "transformers did not refuse this path" in message


def test_transformers_refusing_a_path_is_still_a_skip_with_its_words(
    qwen3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import cache_utils

    model, tokenizer = broken.load_healthy(qwen3_path)
    # how a recurrent model tells generate it cannot roll its state back: a class flag before transformers 5.25,
    # a cache layer that cannot be cropped since
    model._is_stateful = True
    monkeypatch.setattr(cache_utils.DynamicLayer, "is_croppable", False, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        clm.assert_assisted_decoding_matches(model, tokenizer)
    assert re.match(
        r"transformers refuses assisted by itself decoding for Qwen3ForCausalLM: ValueError: (assisted generation is "
        "not supported with stateful models|Assisted decoding requires a cache that can be cropped)",
        str(skipped.value),
    ), str(skipped.value)


# Which invariants each broken model trips, and why the others it trips are tripped too.
EXPECTED_FAILURES = {
    # its frequencies follow each call's length: a shorter prompt and a longer forward disagree only past 64 tokens
    "longrope_switches_per_call": {"long"},
    "static_cache_reused_without_reset": {"stat"},
    "embedding_scale_on_ids_only": {"emb"},
    # a cached step fed one token: assisted decoding appends its proposals to a cached conversation too
    "cached_steps_feed_one_token": {"cont", "asst"},
    "cache_crop_skips_a_layer": {"asst"},
    # assisted decoding asks for its proposals + 1 rows and gets one
    "logits_to_keep_as_a_flag": {"keep", "asst"},
    "reorder_keys_only": {"beam"},
    "warpers_left_out": {"smp"},
    "temperature_applied_twice": {"smp"},
    # a cached step of a left-padded row reads its real position, while the prefill counted the pads as positions
    "rotary_positions_counted_by_the_port": {"pack", "kv", "pad", "stat"},
    # static-cache generate hands the forward the 4D mask it builds itself
    "every_mask_made_additive": {"pack", "stat"},
    # both switch paths past 256 tokens or keys, which no short prompt reaches
    "tiled_prefill_offset_forgotten": {"pref"},
    "split_keys_decode_without_rescale": {"pref"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_each_broken_model_fails_its_invariant_and_only_the_named_others(name: str, llama_path: Path) -> None:
    model, tokenizer = getattr(broken, name)(llama_path)
    failed = {column for column, outcome in _outcomes(model, tokenizer).items() if outcome == "FAIL"}
    assert failed == EXPECTED_FAILURES[name]


def test_the_scale_kernel_fails_only_the_attention_check(granite_path: Path) -> None:
    model, tokenizer = broken.sdpa_forgets_the_scale(granite_path)
    failed = {column for column, outcome in _outcomes(model, tokenizer).items() if outcome == "FAIL"}
    assert failed == {"attn"}


def test_the_long_context_budget_and_compile_options_reach_the_suite(
    pytester: pytest.Pytester, mistral_window_path: Path, qwen3_path: Path
) -> None:
    window = f"--causal-lm-checkpoint={mistral_window_path}"
    capped = pytester.runpytest(
        window, "--causal-lm-suite=only", "-k", "long_context", "-rs", "--causal-lm-long-context-tokens=30"
    )
    capped.assert_outcomes(skipped=1)
    capped.stdout.fnmatch_lines(["*sliding window 32 needs 36+ tokens, beyond the cap of 30*"])
    report = pytester.path / "report.md"
    full = pytester.runpytest(window, "--causal-lm-suite=only", "-k", "long_context", f"--causal-lm-report={report}")
    full.assert_outcomes(passed=1)
    assert "72 tokens across sliding window 32" in report.read_text()
    # torch.compile registers global state on import, which pytester's in-process runs would import twice
    compiled = pytester.runpytest_subprocess(
        f"--causal-lm-checkpoint={qwen3_path}",
        "--causal-lm-suite=only",
        "-k",
        "static_cache",
        "--causal-lm-compile",
        f"--causal-lm-report={report}",
    )
    compiled.assert_outcomes(passed=1)
    assert "compile on" in report.read_text()
