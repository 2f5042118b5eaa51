"""The built-in invariants, registered on import (the package imports this module).

Each entry names its public helper; the suite calls it with the loaded checkpoint's model, tokenizer,
tolerance and seed. The few helpers that need more (files, settings, fixtures) get a short ``run`` here.
Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from . import checks
from .checks._common import CheckResult
from .registry import Invariant, hide_registry_frames, register_invariant

if TYPE_CHECKING:
    from .loading import CausalLM
    from .session import CausalLMSession

__tracebackhide__ = hide_registry_frames  # the glue below is hidden from tracebacks as the registry is


def _snapshots_off(session: CausalLMSession) -> str | None:
    if session.snapshots_enabled():
        return None
    return (
        "behaviour snapshots are opt-in: pass --snapshot-update once (writes them under "
        f"{session.snapshot_root()}), or set --causal-lm-snapshot-dir / causal_lm_snapshot_dir"
    )


def _reference_off(session: CausalLMSession) -> str | None:
    if session.settings.reference:
        return None
    return "no reference configured: pass --causal-lm-reference=CKPT to compare checkpoints with it"


def _classification_head(lm: CausalLM) -> CheckResult:
    source, kwargs = lm.pretrained_location()
    return checks.assert_classification_head_equivalent(
        lm.model, lm.tokenizer, source=source, loading_info=lm.loading_info, tolerance=lm.tolerance, **kwargs
    )


def _snapshot(lm: CausalLM, causal_lm_snapshot: Any, causal_lm_settings: Any) -> None:
    from .snapshot import behaviour_record, record_missing_snapshot

    record = behaviour_record(lm.model, lm.tokenizer, name=lm.target.id)
    record_missing_snapshot(causal_lm_snapshot, record, causal_lm_settings.snapshot_missing)
    assert causal_lm_snapshot == record


def _reference_drift(lm: CausalLM, causal_lm_reference: Any, causal_lm_settings: Any) -> CheckResult:
    report = checks.assert_close_to_reference(
        lm.model,
        lm.tokenizer,
        causal_lm_reference,
        thresholds=causal_lm_settings.reference_thresholds(),
        tolerance=lm.tolerance,
    )
    layers = [f"hidden-state NMSE per layer: {report.layer_table()}"] if report.layer_nmse else []
    return CheckResult("reference drift", figure=("KL mean", report.kl_mean), notes=[str(report), *layers])


def _long_prefill(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    return checks.assert_long_prefill_consistent(
        lm.model, lm.tokenizer, tokens=causal_lm_settings.long_prefill_tokens, seed=lm.seed, tolerance=lm.tolerance
    )


def _static_cache(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    return checks.assert_static_cache_matches(
        lm.model, lm.tokenizer, compile=causal_lm_settings.compile, tolerance=lm.tolerance
    )


def _long_context(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    return checks.assert_long_context_consistent(
        lm.model, lm.tokenizer, budget=causal_lm_settings.long_context_tokens, tolerance=lm.tolerance
    )


def _untrained(lm: CausalLM, settings: Any) -> str | None:
    """Why ``lm`` has random weights on purpose, or None for a checkpoint that should be trained."""
    from .tiny import is_tiny

    if is_tiny(lm.checkpoint):
        return "a tiny: checkpoint"
    return "--causal-lm-random-weights" if settings.random_weights else None


def _knows_language(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    why = _untrained(lm, causal_lm_settings)
    if why:
        pytest.skip(f"random weights on purpose ({why}): nothing to know")
    return checks.assert_knows_language(lm.model, lm.tokenizer, seed=lm.seed)


def _equivalence_off(session: CausalLMSession) -> str | None:
    if session.settings.equivalence_examples:
        return None
    return "equivalent paths are opt-in: pass --causal-lm-equivalence-examples=N to draw N cases"


def _equivalent_paths(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    return checks.assert_equivalent_paths_agree(
        lm.model,
        lm.tokenizer,
        examples=causal_lm_settings.equivalence_examples,
        seed=lm.seed,
        tolerance=lm.tolerance,
    )


def _tensor_parallel_off(session: CausalLMSession) -> str | None:
    if session.settings.tensor_parallel:
        return None
    return "tensor parallelism is opt-in: pass --causal-lm-tensor-parallel=N (N processes, torchrun)"


def _tensor_parallel(lm: CausalLM, causal_lm_settings: Any) -> CheckResult:
    location, kwargs = lm.pretrained_location()
    return checks.assert_tensor_parallel_matches(
        lm.model,
        lm.tokenizer,
        processes=causal_lm_settings.tensor_parallel,
        location=location,
        from_pretrained_kwargs=kwargs,
        tolerance=lm.tolerance,
    )


def _placement_off(session: CausalLMSession) -> str | None:
    settings = session.settings
    if settings.device_map or settings.offload_parity:
        return None
    return "device_map parity is opt-in: pass --causal-lm-offload-parity, or run with --causal-lm-device-map"


def _device_map_parity(lm: CausalLM) -> CheckResult:
    from .loading import parse_max_memory

    location, kwargs = lm.pretrained_location()
    if lm.target.device_map:
        room = checks.single_device_room(lm.model)
        if room:
            pytest.skip(f"device_map parity: {room}")
    return checks.assert_device_map_parity(
        lm.model,
        lm.tokenizer,
        location=location,
        from_pretrained_kwargs=kwargs,
        max_memory=parse_max_memory(lm.target.max_memory) if lm.target.max_memory else None,
        tolerance=lm.tolerance,
    )


_NO_CACHE = r"returns no past_key_values|returns no cache"
_NEEDS_KV = r"needs a key/value cache|feeds a key/value cache"
_BUILT_IN = (
    Invariant(
        "weights_loaded",
        "weights loaded",
        "wts",
        "weights",
        "the session's own `from_pretrained` reports no missing (randomly initialised), unexpected (thrown away) or mismatched keys beyond what the architecture declares ignorable, grouped by pattern with the likely cause (wrong architecture, renamed prefix, untied head)",
        helper="assert_weights_loaded",
        run=lambda lm: checks.assert_weights_loaded(lm.model, lm.loading_info),
    ),
    Invariant(
        "knows_language",
        "knows language",
        "lang",
        "weights",
        "a trained checkpoint predicts built-in prose far better than chance (mean NLL <= 0.5 x log(vocab); SmolLM2-135M: 0.24) and copies: on 48 random tokens repeated, the second copy's NLL <= 0.5 x the first's (SmolLM2-135M: 0.20); skipped for `tiny:` checkpoints and under `--causal-lm-random-weights`",
        helper="assert_knows_language",
        run=_knows_language,
        fixtures=("causal_lm_settings",),
        healthy_skips=(r"random weights on purpose",),
    ),
    Invariant(
        "output_shapes",
        "output shapes",
        "shap",
        "shapes",
        "logits `(batch, seq, vocab)` for batch 1 and a padded batch; one hidden state per decoder block plus the embeddings, each `seq` positions of `hidden_size` (models with several residual streams may lay them out their own way); every attention layer's cached keys and values hold batch 1 and all `seq` positions (at most `seq` for sliding-window layers; heads and head size are left alone, since multi-query, multi-latent and compressed caches differ); all logits finite",
        helper="assert_output_shapes",
    ),
    Invariant(
        "logits_to_keep",
        "logits_to_keep",
        "keep",
        "shapes",
        "`logits_to_keep=k` returns the last `k` rows only, equal to the full forward's, for k = 1 (what `generate` asks) and 3 (assisted decoding asks for its proposals + 1); skipped when `forward` has no such argument",
        helper="assert_logits_to_keep",
        healthy_skips=(r"has no logits_to_keep argument",),
    ),
    Invariant(
        "vocab_alignment",
        "vocab alignment",
        "voc",
        "vocab",
        "logits width == `config.vocab_size` == output embedding rows <= input embedding rows (a spare input row, as Moshi keeps, is harmless); every token id the tokenizer can produce (`len(tokenizer)`, special and added tokens) is `< vocab_size` (a padded, larger vocab_size is fine); argmax ids decode",
        helper="assert_vocab_alignment",
    ),
    Invariant(
        "special_token_ids",
        "special token ids",
        "ids",
        "vocab",
        "eos of tokenizer and config are among the ids `generation_config` stops at; bos and pad ids are equal wherever set",
        helper="assert_special_tokens_agree",
    ),
    Invariant(
        "prefix_causality",
        "prefix causality",
        "caus",
        "causality",
        'the tutorial\'s "Hi dog" / "Hi dog how are you?" generalised: scores before a change do not move when tokens are appended (1 and 4), a single token changes (start, middle, end) or the tail is replaced; on natural text and random ids',
        helper="assert_prefix_causal",
    ),
    Invariant(
        "determinism",
        "determinism",
        "det",
        "determinism",
        "the same input twice gives the same scores (dropout left on)",
        helper="assert_deterministic",
    ),
    Invariant(
        "training_step",
        "training step",
        "trn",
        "training",
        "`labels=` gives the mean cross-entropy of the logits shifted by one over tokens not labelled -100, alone and "
        "in a right-padded batch; gradient checkpointing changes neither loss nor gradients; gradients are finite; "
        "`train()` without dropout scores as `eval()`",
        helper="assert_training_step_consistent",
    ),
    Invariant(
        "kv_cache_parity",
        "KV-cache parity",
        "kv",
        "cache",
        "scores from incremental decoding with `past_key_values` equal the full forward's at every position: prefill then one token per step; prefill in 2 and 3 chunks; a left-padded batch extended token by token (skipped for recurrent/state-space caches)",
        helper="assert_kv_cache_parity",
        healthy_skips=(r"recurrent/state-space cache", _NO_CACHE),
    ),
    Invariant(
        "cache_effectiveness",
        "cache effectiveness",
        "c1",
        "cache",
        "during cached `generate`, every step after the prefill feeds exactly one new token per sequence (counted with a forward hook, never timed)",
        helper="assert_cache_effective",
        healthy_skips=(_NO_CACHE,),
    ),
    Invariant(
        "static_cache",
        "static cache",
        "stat",
        "cache",
        '`generate(cache_implementation="static")` scores every step as one forward pass over the same tokens: a prompt, then a longer one (no keys or write position kept from the first call), then a left-padded batch; with `--causal-lm-compile` under `torch.compile` too',
        helper="assert_static_cache_matches",
        run=_static_cache,
        fixtures=("causal_lm_settings",),
        healthy_skips=(r"transformers refuses static-cache generation", _NEEDS_KV),
    ),
    Invariant(
        "long_context",
        "long context",
        "long",
        "context",
        "KV-cache parity and prefix causality on a sequence crossing every boundary the config declares (sliding window, attention chunk, RoPE scaling's original context): chunks straddling each boundary and single steps past it, prefixes ending on either side; around each boundary and a sample of the rest; length from the config, capped by `max_position_embeddings` and `--causal-lm-long-context-tokens`",
        helper="assert_long_context_consistent",
        run=_long_context,
        fixtures=("causal_lm_settings",),
        healthy_skips=(r"declares no context boundary", r"beyond the cap of", _NEEDS_KV),
    ),
    Invariant(
        "long_prefill",
        "long prefill",
        "pref",
        "context",
        "One forward of a long prompt (1024 tokens where the context allows; `--causal-lm-long-prefill-tokens`, on by default on CPU up to 10M parameters and on accelerators at 4096) scores as the same prompt fed through the cache in chunks of a quarter plus one and then single steps, and as its prefixes ending at 3 seeded random lengths (causality); at 24 seeded positions, both sides of every chunk edge and each prefix's end",
        helper="assert_long_prefill_consistent",
        run=_long_prefill,
        fixtures=("causal_lm_settings",),
        healthy_skips=(r"long prefill: off by default on CPU", r"leaves no long prompt"),
    ),
    Invariant(
        "generation_defaults",
        "generation defaults",
        "gdef",
        "generation",
        "the checkpoint's own `generation_config.json` passes transformers' strict validation (no sampling settings next to `do_sample: false`), names no stop id outside the vocabulary, and a plain `model.generate(**tokenizer(prompt, return_tensors=\"pt\"))` on it alone (seeded when it samples) returns new tokens; the verdict notes defaults that change a plain call's output (sampling, `repetition_penalty`, a 20-token `max_length`)",
        helper="assert_generation_defaults",
    ),
    Invariant(
        "far_positions",
        "far positions",
        "far",
        "context",
        "up to `max_position_embeddings` without a long input: for encodings that depend on distance only (RoPE without length-dependent scaling, ALiBi; decided from the config) a 16-token window with `position_ids` shifted to a quarter, half and the end of the context scores as at the start (per-position KL <= 0.25 nats); learned absolute position embeddings give finite scores there",
        helper="assert_far_positions_consistent",
        healthy_skips=(
            r"far positions: (RoPE \w+ scales|the config declares|max_position_embeddings \d+ is too short)",
        ),
    ),
    Invariant(
        "greedy_loop_parity",
        "greedy-loop parity",
        "grdy",
        "generation",
        "the tutorial's loop (forward, argmax of the last position, append, stop at eos) gives the same tokens as `model.generate` with an explicit greedy config, on plain and chat-formatted prompts: with the cache step by step, and without it in one pass along generate's tokens (the scores the uncached loop would see, given prefix causality)",
        helper="assert_greedy_parity",
    ),
    Invariant(
        "continuation",
        "continuation",
        "cont",
        "generation",
        "`generate` continued from the `past_key_values` it returned (after its own tokens, then after an appended multi-token turn, as multi-turn chat does) scores every step as one forward pass over the whole conversation",
        helper="assert_continuation_matches",
        healthy_skips=(_NEEDS_KV,),
    ),
    Invariant(
        "assisted_decoding",
        "assisted decoding",
        "asst",
        "generation",
        "assisted decoding with the model as its own assistant, and prompt-lookup decoding on a prompt that repeats itself, score every step as one forward pass (several proposed tokens verified per forward, the cache cropped after a rejection)",
        helper="assert_assisted_decoding_matches",
        healthy_skips=(r"transformers refuses (assisted by itself|prompt lookup) decoding", _NEEDS_KV),
    ),
    Invariant(
        "beam_search",
        "beam search",
        "beam",
        "beam",
        "4 beams with the cache return the sequences and scores they return without it; each sequence's score is its tokens' log-probabilities under a plain forward over its length (length_penalty 1); the verdict counts the steps at which a beam changed cache rows",
        helper="assert_beam_search_consistent",
        healthy_skips=(r"transformers refuses beam search",),
    ),
    Invariant(
        "sampling",
        "sampling",
        "smp",
        "sampling",
        "with the checkpoint's own sampling settings (representative ones where it does not sample), 2 seeded samples per prompt: the same seed draws the same tokens; every step's raw scores equal one forward pass over the sampled tokens; every step's processed scores are temperature, top_k, top_p, min_p and repetition_penalty applied by hand (same tokens kept, same probabilities); `top_k=1` draws greedy's tokens",
        helper="assert_sampling_consistent",
        healthy_skips=(r"transformers refuses sampling",),
    ),
    Invariant(
        "inputs_embeds",
        "inputs_embeds",
        "emb",
        "embeddings",
        "`forward(inputs_embeds=get_input_embeddings()(ids))` equals `forward(input_ids=ids)` (an embedding scale such as Gemma's applies on both paths), and `generate(inputs_embeds=...)` scores every step as a forward pass over the same tokens",
        helper="assert_inputs_embeds_match",
        healthy_skips=(r"has no inputs_embeds argument", r"transformers refuses generation from inputs_embeds"),
    ),
    Invariant(
        "attention_implementations",
        "attention implementations",
        "attn",
        "attention",
        "every attention implementation the model supports and the machine has (eager, sdpa; flash-attention and flex on accelerators) gives eager's scores, plain and on a left-padded batch, and its greedy continuation; the verdict notes which were compared",
        helper="assert_attention_implementations_agree",
        healthy_skips=(r"can run here",),
    ),
    Invariant(
        "classification_head",
        "classification head",
        "cls",
        "classification",
        '`AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=vocab_size, key_mapping={"lm_head.weight": "score.weight"})` gives the causal LM\'s last-position scores (alone, left- and right-padded), and generating by classification reproduces `generate`',
        helper="assert_classification_head_equivalent",
        run=_classification_head,
        healthy_skips=(
            r"has no sequence-classification class",
            r"has no last-token linear score head",
            r"applies (final logit soft-capping|logit scaling|output multiplier|lm_head multiplier)",
        ),
    ),
    Invariant(
        "padding_invariance",
        "padding invariance",
        "pad",
        "padding",
        "a left-padded batch gives each prompt's own last-token scores and greedy continuation, and a left-padded batch of 16 rows of mixed lengths (kernels switch paths by batch size) each row's own last-token scores; a forward that does not use `position_ids` (probed by stretching them) fails with that cause, since batched generation gives its users wrong text",
        helper="assert_padding_invariant",
    ),
    Invariant(
        "packed_sequences",
        "packed sequences",
        "pack",
        "packing",
        "every sequence scores as it does alone when packed into rows with `position_ids` restarting at 0 and no `attention_mask` (the padding-free format of TRL; the verdict says where the model's masks do not promise it), under a 4D block-causal mask, and as a continuation after a prefix it shares with another under one 4D mask",
        helper="assert_packed_sequences_consistent",
        healthy_skips=(r"packed sequences: .*(takes no position_ids|recurrent/state-space state)",),
    ),
    Invariant(
        "batch_independence",
        "batch independence",
        "bat",
        "padding",
        "a row's scores do not depend on the other rows of the batch: beside two different rows, and in the middle of 16",
        helper="assert_batch_independent",
    ),
    Invariant(
        "chat_template",
        "chat template",
        "chat",
        "chat",
        "`apply_chat_template(tokenize=True)` equals tokenizing the rendered text without added specials, with no doubled BOS; `enable_thinking=False` reaches templates that use it (skipped without a template)",
        helper="assert_chat_template_consistent",
        healthy_skips=(r"the tokenizer has no chat template",),
    ),
    Invariant(
        "dtype_parity",
        "dtype parity",
        "dtyp",
        "precision",
        "in half precision (the run dtype, or the checkpoint's stored dtype under a float32 run) the same weights agree with float32 on three prompts and a 384-token sequence (attention over hundreds of keys, positions past bfloat16's exact integers): finite, varied score rows, KL mean and top-1 within float32's top 5, greedy agreement on the prompts up to a first divergence inside both top 5s",
        helper="assert_dtype_parity",
        run=lambda lm: checks.assert_dtype_parity(
            lm.model, lm.tokenizer, tolerance=lm.tolerance, stored_dtype=lm.stored_dtype
        ),
        healthy_skips=(r"a float32 run of a checkpoint", r"dtype parity needs the weights in"),
    ),
    Invariant(
        "tokenizer_round_trip",
        "tokenizer round trip",
        "rt",
        "tokenizer",
        "`decode(encode(text))` gives the text back on a built-in corpus (prose, indented code, numbers, accents and scripts, emoji, leading and repeated spaces, newlines), plain and with special tokens added then skipped; declared normalizations (lowercasing, accent stripping) are allowed",
        helper="assert_tokenizer_round_trip",
    ),
    Invariant(
        "chat_turns",
        "chat turns",
        "turn",
        "chat",
        "judged by rendering: a user message, system + user, and three-turn histories with and without a system message each render every message's content exactly once and in order (a template may reject a system role by raising, never drop or reorder a message)",
        helper="assert_chat_turns_rendered",
        healthy_skips=(r"the tokenizer has no chat template",),
    ),
    Invariant(
        "decoded_answer",
        "decoded answer",
        "dec",
        "tokenizer",
        "`decode(..., skip_special_tokens=True)` of a templated assistant answer and of the whole conversation, as chat UIs and pipelines decode, shows none of the markers the template writes (each must be registered as special)",
        helper="assert_decoded_answer_has_no_markers",
        healthy_skips=(r"the tokenizer has no chat template",),
    ),
    Invariant(
        "streamed_decode",
        "streamed decode",
        "strm",
        "tokenizer",
        "transformers' `TextStreamer` fed one token at a time shows the text one `decode` of the same ids shows, on a chat answer and the round-trip corpus (indentation after newlines, split multi-byte characters, repeated spaces)",
        helper="assert_streamed_decode_matches",
    ),
    Invariant(
        "prompt_special_tokens",
        "prompt special tokens",
        "spec",
        "tokenizer",
        "a plain `tokenizer(text)` never appends eos or a separator, keeps the text's own ids, and adds a BOS exactly when the chat template writes one",
        helper="assert_prompt_special_tokens",
    ),
    Invariant(
        "chat_markers",
        "chat markers",
        "mark",
        "chat",
        "every marker the template writes (`<|im_start|>`, `<start_of_turn>`, `<think>`, `[INST]`, ...) is one registered special/added token inside the embedding rows",
        helper="assert_chat_markers_are_tokens",
        healthy_skips=(r"the tokenizer has no chat template",),
    ),
    Invariant(
        "generation_prompt",
        "generation prompt",
        "gp",
        "chat",
        "judged by rendering: the conversation answered by the assistant starts with the `add_generation_prompt=True` rendering and continues with the answer (after a reasoning block)",
        helper="assert_generation_prompt_opens_the_answer",
        healthy_skips=(r"the tokenizer has no chat template",),
    ),
    Invariant(
        "turn_terminator",
        "turn terminator",
        "term",
        "chat",
        "the token the template writes after an assistant message stops `generate` (forced as the first new token, generation must end there)",
        helper="assert_turn_terminator_stops_generation",
        healthy_skips=(r"the tokenizer has no chat template", r"the template marks no turn with a special token"),
    ),
    Invariant(
        "equivalent_paths",
        "equivalent paths",
        "eqv",
        "equivalence",
        "every row of N drawn cases (1-16 rows of natural text, up to 512 tokens in float32 where forwards are cheap, left-padded in one forward or fed through the cache in chunks then single steps, right-padded with the mask alone, or packed in one row by restarting position_ids, under each attention implementation that runs here) scores as it does alone under the same implementation; hypothesis (seeded, no database) shrinks a failing case to the smallest it finds before it is reported; N from `--causal-lm-equivalence-examples` (needs the `equivalence` extra)",
        helper="assert_equivalent_paths_agree",
        run=_equivalent_paths,
        fixtures=("causal_lm_settings",),
        opt_in=_equivalence_off,
    ),
    Invariant(
        "tensor_parallel",
        "tensor parallel",
        "tp",
        "distributed",
        'the checkpoint loaded with `tp_plan="auto"` in N `torchrun` processes (gloo on CPU, nccl on GPUs) gives the single-process scores on a prompt, a left-padded batch and cached decoding step by step, and the same greedy continuation; a worker\'s error comes back naming its rank and module; skipped where the architecture declares no plan or N does not divide its heads',
        helper="assert_tensor_parallel_matches",
        run=_tensor_parallel,
        fixtures=("causal_lm_settings",),
        opt_in=_tensor_parallel_off,
        healthy_skips=(r"tensor parallelism: .*(declares no tensor-parallel plan|does not divide)",),
    ),
    Invariant(
        "device_map_parity",
        "device_map parity",
        "map",
        "distributed",
        'the checkpoint spread by accelerate (`device_map="auto"` under a `max_memory` that sends most layers to disk) gives the one-device scores on a prompt, a left-padded batch and cached decoding, and the same greedy continuation; with `--causal-lm-device-map` the session\'s spread model is compared with a one-device load where that fits',
        helper="assert_device_map_parity",
        run=_device_map_parity,
        opt_in=_placement_off,
        healthy_skips=(r"device_map parity: the one-device model does not fit",),
    ),
    Invariant(
        "behaviour_snapshot",
        "behaviour snapshot",
        "snap",
        "snapshot",
        "greedy continuations and their log-probabilities equal the syrupy snapshot stored in your repo (near-ties and a stored tolerance allowed)",
        helper="behaviour_record",
        run=_snapshot,
        fixtures=("causal_lm_snapshot", "causal_lm_settings"),
        opt_in=_snapshots_off,
    ),
    Invariant(
        "reference_drift",
        "reference drift",
        "ref",
        "reference",
        "KL divergence, top-1/top-5 and greedy agreement and perplexity against `--causal-lm-reference`, within thresholds",
        helper="assert_close_to_reference",
        run=_reference_drift,
        fixtures=("causal_lm_reference", "causal_lm_settings"),
        opt_in=_reference_off,
    ),
)
for _invariant in _BUILT_IN:
    register_invariant(_invariant)
