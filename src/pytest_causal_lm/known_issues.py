"""What the suite knows about transformers itself: behaviours of its own implementations that every checkpoint
of an architecture shows, which the suite fails rightly. The architecture matrix (tests/test_architectures.py)
pins each to exactly these failures on tiny checkpoints; when a user's checkpoint fails the same way, the verdict
says it is a transformers bug or design, not the checkpoint's. Importing this module does not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

__all__ = [
    "KNOWN_DISCREPANCIES",
    "LINEAR_ATTENTION_CROP_MODELS",
    "TENSOR_PARALLEL_DISCREPANCIES",
    "KnownDiscrepancy",
    "known_discrepancy",
]


@dataclass(frozen=True)
class KnownDiscrepancy:
    """Invariants (keys) an architecture fails in transformers, each with a regex its failure message matches;
    why; the transformers versions that show it (a PEP 440 specifier, empty for every verified version); and,
    for a bug of one release, a minimal reproduction."""

    failing: dict[str, str]
    why: str
    transformers: str = ""
    reproduction: str = ""

    def applies_to(self, version: str) -> bool:
        from packaging.specifiers import SpecifierSet

        return not self.transformers or SpecifierSet(self.transformers).contains(version, prereleases=True)


_POSITIONS_FROM_ZERO = r"likely cause\s+: the forward's default positions are not the ones generate passes"
_ROBERTA_POSITIONS = KnownDiscrepancy(
    dict.fromkeys(
        [
            "greedy_loop_parity",
            "padding_invariance",
            "static_cache",
            "continuation",
            "assisted_decoding",
            "inputs_embeds",
            "beam_search",
            "sampling",
        ],
        _POSITIONS_FROM_ZERO,
    ),
    "transformers 5's generate passes position_ids counted from 0; the forward, given none, counts from "
    "padding_idx + 1 (RoBERTa's convention), so generate decodes with other position embeddings than the model",
)
_NO_POSITION_IDS = KnownDiscrepancy(
    {"padding_invariance": r"likely cause\s+: \w+\.forward does not use position_ids: left padding shifts"},
    "the forward takes no position_ids (learned absolute positions counted from 0), so a left-padded row's tokens "
    "sit at other positions than the prompt alone and batched generation with left padding gives other text; "
    "transformers' own tests skip left padding for these models",
)
# Gated-DeltaNet hybrids whose prompt-lookup path first ran in transformers 5.25 (5.24 refused assisted decoding
# for them), where it meets one bug in the shared linear-attention cache layer.
LINEAR_ATTENTION_CROP_MODELS = (
    "bailing_hybrid",
    "granitemoehybrid",
    "kimi_linear",
    "lara_mini",
    "nemotron_h",
    "olmo_hybrid",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_5_text",
    "qwen3_next",
    "qwen4_exp",
    "qwen4_exp_text",
)
_PROMPT_LOOKUP = r"prompt lookup decoding: step \d+ of row 0 scores differently from one forward pass"
_LINEAR_ATTENTION_CROP = KnownDiscrepancy(
    {"assisted_decoding": _PROMPT_LOOKUP},
    "prompt-lookup decoding rolls its linear-attention state back to the wrong point after a rejection: "
    "LinearAttentionCacheLayerMixin.crop (shared by every linear-attention and Mamba state layer) restores a state from a history that every verification forward extends, and the "
    "next step then scores as if from another prefix (2.25 logits off at step 1 on tiny:qwen3_next in float32; "
    "assisted decoding by the model itself passes). transformers 5.24 refused assisted decoding for these models, "
    "so the path first ran in 5.25",
    transformers=">=5.25",
    reproduction=(
        "model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=8, do_sample=False, "
        "return_dict_in_generate=True, output_logits=True) on a prompt that repeats itself: the logits of step 1 "
        "differ from model(prompt + generated tokens).logits at that position (tiny:qwen3_next, float32)"
    ),
)
# The causal-LM classes of encoder-decoder models' decoders (and TrOCR's text decoder)
_SEQ2SEQ_DECODERS = (
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
)
KNOWN_DISCREPANCIES: dict[str, KnownDiscrepancy] = {
    "ctrl": KnownDiscrepancy(
        {"inputs_embeds": r"forward\(inputs_embeds=...\) changed the tensor it was given, in place"},
        "CTRLModel scales the caller's inputs_embeds in place (`inputs_embeds *= np.sqrt(d_model_size)`), so a "
        "second call with the same embeddings (a retry, generate after a forward) scales them again",
    ),
    "moshi": KnownDiscrepancy(
        {
            "long_context": r"long context: cached pass, segment 3 of 6 \(positions 33..33\)",
            "continuation": r"generate continued after a new turn",
            "assisted_decoding": r"prompt lookup decoding",
        },
        "Moshi's forward masks with create_causal_mask (no window) while its config's sliding_window makes the "
        "DynamicCache keep only the last window - 1 keys: past the window, cached decoding sees fewer tokens than "
        "the full forward (measured from position 33 with a window of 32)",
    ),
    "recurrent_gemma": KnownDiscrepancy(
        {"attention_implementations": r"'sdpa' differs from 'eager' on a left-padded batch"},
        "its recurrent blocks carry every position, pad tokens included, into the next ones; the attention "
        "blocks give fully masked pad rows other values under eager than under sdpa, so a left-padded row's "
        "real tokens score differently with the two (padding invariance holds under sdpa, the default)",
    ),
    "deepseek_v4": KnownDiscrepancy(
        {
            "static_cache": r"KeyError: 'heavily_compressed_attention'",
            "inputs_embeds": r"'NoneType' object has no attribute 'reshape'",
        },
        "StaticCache has no layer class for DeepSeek-V4's compressed-attention layer types (KeyError instead of "
        "a refusal), and its forward reads input_ids even when given inputs_embeds",
    ),
    **dict.fromkeys(
        ["gemma4", "gemma4_unified"],
        KnownDiscrepancy(
            {"inputs_embeds": r"IndexError: index out of range in self"},
            "its per-layer embeddings need input_ids; from inputs_embeds alone it recovers them by exact equality "
            "with the scaled embedding rows, which generate(inputs_embeds=...) does not survive",
        ),
    ),
    **dict.fromkeys(
        ["camembert", "data2vec-text", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod"],
        _ROBERTA_POSITIONS,
    ),
    **dict.fromkeys(
        _SEQ2SEQ_DECODERS,
        _NO_POSITION_IDS,
    ),
    "rwkv": KnownDiscrepancy(
        {"padding_invariance": r"RwkvForCausalLM\.forward uses neither attention_mask nor position_ids"},
        "RWKV's recurrence reads every token, pad tokens included: neither attention_mask nor position_ids reach it",
    ),
    "bamba": KnownDiscrepancy(
        {
            "kv_cache_parity": r"KV-cache parity violated: decoding step 1 ",
            "greedy_loop_parity": r"greedy-loop parity violated",
            "assisted_decoding": _PROMPT_LOOKUP,
        },
        "BambaModel.forward, given no position_ids, counts positions from 0 even after a cache, so a cached "
        "step gets the rotary position of token 0 (GraniteMoeHybrid, with the same Mamba mixer, adds the cached length); "
        "prompt lookup, which first runs for it in transformers 5.25, also meets the linear-attention crop bug below",
    ),
    "git": KnownDiscrepancy(
        {
            "kv_cache_parity": r"KV-cache parity violated: left-padded batch",
            "padding_invariance": r"padding changes the greedy continuation",
            "inputs_embeds": r"forward\(inputs_embeds=...\) changed the tensor it was given, in place",
        },
        "GIT widens a cached step's attention mask by its image-patch count even when no image was given, "
        "so left-padded cached decoding masks the wrong positions; GitEmbeddings adds the position embeddings "
        "to the caller's inputs_embeds in place (`embeddings += ...`), so reusing them adds positions twice",
    ),
    "jamba": KnownDiscrepancy(
        {
            "kv_cache_parity": r"KV-cache parity violated: chunk 2 of 2",
            "continuation": r"generate continued after a new turn",
            "assisted_decoding": _PROMPT_LOOKUP,
        },
        "Jamba's torch Mamba path uses the cached SSM state only for one-token steps; a multi-token step after "
        "a cache (chunked prefill, a new chat turn appended to a cached conversation, prompt lookup's verification "
        "step, which first runs for it in transformers 5.25) restarts from a zero state",
    ),
    "reformer": KnownDiscrepancy(
        {"padding_invariance": r"padding changes the greedy continuation"},
        "Reformer's prepare_inputs_for_generation drops attention_mask and position_ids, so a left-padded "
        "generate reads the pad tokens",
    ),
    "whisper": KnownDiscrepancy(
        {
            "padding_invariance": r"padding changes the greedy continuation",
            "static_cache": r"static cache differs \(left-padded batch of 3\)",
        },
        "WhisperForCausalLM takes position_ids only through **kwargs; generate passes position_ids only to a "
        "forward whose signature names them, so left-padded generation shifts every position",
    ),
    "xlm": KnownDiscrepancy(
        {
            "greedy_loop_parity": r"greedy-loop parity violated",
            "padding_invariance": r"padding changes scores",
        },
        "XLM's generate appends its mask token and predicts there, and its causal attention mask ignores the "
        "padding mask (get_masks), so pad tokens are attended",
    ),
    "xlnet": KnownDiscrepancy(
        {
            "prefix_causality": r"prefix causality violated",
            "greedy_loop_parity": r"greedy-loop parity violated",
            "padding_invariance": r"XLNetLMHeadModel\.forward does not use position_ids",
            "generation_defaults": r"`max_length` is set to -1",
        },
        "XLNet attends bidirectionally over its input by default (attn_type='bi'), and its generate appends a "
        "dummy token with a permutation mask; a plain generate() without max_new_tokens raises, since its config "
        "reports max_position_embeddings=-1 (no limit) and generate caps its default max_length at that",
    ),
    "prophetnet": KnownDiscrepancy(
        {
            "prefix_causality": r"prefix causality violated",
            "kv_cache_parity": r"KV-cache parity violated",
            "greedy_loop_parity": r"greedy-loop parity violated",
            "padding_invariance": r"ProphetNetForCausalLM\.forward does not use position_ids",
            "static_cache": r"size of tensor a",
            "continuation": r"generate continued from its returned past_key_values",
            "inputs_embeds": r"generate\(inputs_embeds=...\): step 0",
            "assisted_decoding": r"At the moment `use_cache` is only supported for `decoder_input_ids` of length 1",
        },
        "ProphetNetForCausalLM's logits come from its first n-gram predicting stream; run on its own, earlier "
        "positions' scores change when tokens are appended and cached decoding differs (so every cached path "
        "into generate does), and its n-gram attention cannot size a static cache; the leak inside the n-gram "
        "attention is not traced further; assisted decoding, which reaches it from transformers 5.25, feeds "
        "several tokens after a cache, which its decoder asserts against",
    ),
    "cpmant": KnownDiscrepancy(
        {
            "output_shapes": r"cache layer 0 keys\s+: shape \(1, \d+, 38, ",
            "prefix_causality": r"prefix causality violated",
            "kv_cache_parity": r"size of tensor a",
            "cache_effectiveness": r"cache not effective",
            "greedy_loop_parity": r"size of tensor a",
            "padding_invariance": r"CpmAntForCausalLM\.forward uses neither attention_mask nor position_ids",
            "static_cache": r"index_copy_\(\): index \d+ is out of bounds",
            "continuation": r"generate continued from its returned past_key_values",
            "assisted_decoding": r"assisted by itself decoding",
        },
        "CPM-Ant prepends 32 internal prompt positions to every input and to its cache, so cached decoding "
        "cannot line up, and position 0's scores change when the input grows",
    ),
    **dict.fromkeys(LINEAR_ATTENTION_CROP_MODELS, _LINEAR_ATTENTION_CROP),
}

# The training step (``labels=``): where a ForCausalLM class of transformers computes its loss another way by
# design, added to the entries above.
_TRAINING_STEP: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        [*_SEQ2SEQ_DECODERS, "cpmant", "whisper", "xlm", "xlnet"],
        (
            r"likely cause  : the labels are not shifted",
            "its ForCausalLM loss scores position t against label t: it expects labels already shifted, as a "
            "seq2seq decoder's are, so a causal-LM data collator's labels (input_ids, shifted inside the loss by "
            "every decoder-only model) train it to copy its input",
        ),
    ),
    "prophetnet": (
        r"the loss from labels= is not the mean cross-entropy of the logits shifted by one",
        "its loss adds the n-gram streams' losses with label smoothing, not the cross-entropy of the logits it returns",
    ),
    "git": (
        r"Expected input batch_size \(0\) to match target batch_size",
        "GitForCausalLM's loss drops as many leading positions as an image has patches even when no image was "
        "given, so a text-only row shorter than that leaves nothing to score",
    ),
    "reformer": (
        r"axial_pos_shape factors",
        "in training mode its axial position embeddings need the sequence to be exactly as long as the product "
        "of axial_pos_shape (512 on the tiny config)",
    ),
}

# Beam search: where transformers' generate reorders a cache it does not hold, or scores beams by design otherwise.
_BEAM_SCORE = r"beam search: the score of returned sequence \d is not its tokens' log-probabilities"
_BEAM_SEARCH: dict[str, tuple[str, str]] = {
    "minimax": (
        _BEAM_SCORE,
        "MiniMaxCache keeps the lightning-attention states in its own linear_cache and overrides "
        "batch_select_indices but not reorder_cache, so beam search reorders the attention layers' keys and values "
        "and leaves each beam with another beam's linear-attention state (1.2 off the forward's score on tiny)",
    ),
    "recurrent_gemma": (
        _BEAM_SCORE,
        "RecurrentGemma keeps its recurrent and convolution states inside its layers, where beam search's cache "
        "reorder does not reach, so after beams overtake each other they continue from other beams' states",
    ),
    **dict.fromkeys(
        ["cpmant", "prophetnet", "xlm", "xlnet"],
        (_BEAM_SCORE, "the cached or generate-time path that breaks greedy decoding above breaks beam scores too"),
    ),
}


# Sampling: generate's raw scores along the sampled tokens (two returned rows per prompt) against one forward.
_SAMPLED_STEP = r"sampling \(seed \d+, .*\): step \d+ of row \d scores differently from one forward pass"
_SAMPLING: dict[str, tuple[str, str]] = {
    "rwkv": (
        _SAMPLED_STEP,
        "RWKV's cached decoding of a batch of two identical rows departs from the forward from the first cached "
        "step (0.69 on tiny; one row agrees to 6e-7); sampling's num_return_sequences=2 is such a batch. "
        "Reproduction: generate(ids.expand(2, -1), do_sample=False, output_logits=True) against "
        "model(out.sequences).logits",
    ),
    "moshi": (
        _SAMPLED_STEP,
        "the window mismatch above: the repeating prompt is longer than the tiny config's window of 32",
    ),
    **dict.fromkeys(
        ["cpmant", "prophetnet", "xlm", "xlnet"],
        (_SAMPLED_STEP, "the cached or generate-time path that breaks greedy decoding above breaks sampling too"),
    ),
}


# Long prefill: one forward of the prompt (512 tokens on the tiny configs, 1024 where they declare no limit)
# against chunks of a quarter plus one through the cache and prefixes alone.
_SECOND_CHUNK = r"long prefill: cached pass, segment 2 of 7 \(positions 129..257\) differs from the full forward"
_LONG_PREFILL: dict[str, tuple[str, str]] = {
    "bamba": (
        _SECOND_CHUNK + r"[\s\S]*first departing module\s+: model.rotary_emb",
        "the positions counted from 0 after a cache, above: the second chunk gets the rotary positions of the first",
    ),
    "jamba": (_SECOND_CHUNK, "the second chunk is a multi-token step after a cache, which restarts from a zero state"),
    "moshi": (_SECOND_CHUNK, "the window mismatch above: the second chunk's keys outrun the cache's window of 32"),
    "cpmant": (
        r"long prefill: cached pass, segment 1 of 7 \(positions 0..256\) differs from the full forward from position 0",
        "its internal prompt positions, above: position 0 scores differently in a 257-token and a 1024-token call",
    ),
    "xlnet": (
        r"long prefill: prefix causality: the first \d+ tokens alone score position 0 unlike",
        "its bidirectional attention, above",
    ),
    "prophetnet": (
        r"long prefill raised IndexError: index out of range in self",
        "its predicting stream looks up position + 1, so the longest input it takes is one token shorter than its "
        "position table allows (510 tokens for 512 rows from row 1)",
    ),
}


def _with(extra: dict[str, tuple[str, str]], key: str) -> None:
    """Add invariant ``key``'s failure to the entries above (a new entry where an architecture has none)."""
    for name, (pattern, why) in extra.items():
        known = KNOWN_DISCREPANCIES.get(name)
        KNOWN_DISCREPANCIES[name] = (
            KnownDiscrepancy({key: pattern}, why)
            if known is None
            else replace(known, failing={**known.failing, key: pattern}, why=f"{known.why}; {why}")
        )


_with(_TRAINING_STEP, "training_step")
_with(_BEAM_SEARCH, "beam_search")
_with(_SAMPLING, "sampling")
_with(_LONG_PREFILL, "long_prefill")

# Architectures whose transformers tensor-parallel plan breaks at N=2 on the tiny checkpoints (transformers
# 5.23.0 and 5.25.0, gloo on CPU): the failure each gives, why, and the versions that show it. Every other
# architecture with a plan passes.
_TP_EXPERT_CONVERSION = KnownDiscrepancy(
    {"tensor_parallel": r"rank 0, in loading: RuntimeError: We encountered some issues during automatic conversion"},
    "loading with tp_plan='auto' fails in transformers' conversion of the stored expert weights to the sharded "
    "fused layout (the load report's CONVERSION entries say which); the one-process load converts them fine",
    transformers=">=5.25",
)
TENSOR_PARALLEL_DISCREPANCIES: dict[str, KnownDiscrepancy] = {
    "doge": KnownDiscrepancy(
        {
            "tensor_parallel": r"in model.layers.0.self_attn.dt_proj: RuntimeError: output with shape .* doesn't match the broadcast shape"
        },
        "the plan shards the attention heads but not the dynamic-mask parameter A that dt_proj's output is "
        "broadcast with, so the local heads meet all heads",
    ),
    "gemma4": KnownDiscrepancy(
        {
            "tensor_parallel": r"in model.language_model.embed_tokens: RuntimeError: aten.where.self got mixed torch.Tensor and DTensor"
        },
        "the sharded embedding's DTensor output meets a plain tensor in Gemma 4's per-layer-input lookup",
    ),
    "hrm_text": KnownDiscrepancy(
        {"tensor_parallel": r"the scores of a prompt differ from the single process's"},
        "every position's scores differ (up to 0.99): its recurrent high/low-level modules run a layer whose "
        "sharded output is not gathered back; the plan does not fit the model",
    ),
    "inkling_text": KnownDiscrepancy(
        {"tensor_parallel": r"in model.embed_tokens.embed_norm: AssertionError"},
        "the embedding norm asserts on the shape of the sharded embedding output (passes from 5.25)",
        transformers="<5.25",
    ),
    "lfm2": KnownDiscrepancy(
        {"tensor_parallel": r"in lm_head: RuntimeError: narrow unexpectedly changed concrete size"},
        "the gathered head's output is narrowed to the vocabulary twice (768 -> 384 on a 384-token vocabulary; "
        "passes from 5.25)",
        transformers="<5.25",
    ),
    "lfm3": KnownDiscrepancy(
        {"tensor_parallel": r"in lm_head: RuntimeError: narrow unexpectedly changed concrete size"},
        "the same head gather as lfm2",
        transformers="<5.25",
    ),
    **dict.fromkeys(("param2moe", "sarvam_moe"), _TP_EXPERT_CONVERSION),
}


def known_discrepancy(model_type: str, key: str, message: str, version: str) -> KnownDiscrepancy | None:
    """The known discrepancy of transformers ``version`` that explains ``model_type`` failing invariant ``key``
    with ``message``, or None: then the failure is the checkpoint's own (or new)."""
    for table in (KNOWN_DISCREPANCIES, TENSOR_PARALLEL_DISCREPANCIES):
        known = table.get(model_type)
        if known and key in known.failing and known.applies_to(version) and re.search(known.failing[key], message):
            return known
    return None
