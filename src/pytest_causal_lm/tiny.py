"""Tiny, deterministic, real-format checkpoints built offline.

``tiny:qwen3`` (tied embeddings) and ``tiny:llama`` (separate ``lm_head``,
tokenizer that adds BOS) are written with ``save_pretrained`` -- config,
safetensors weights, generation config and a byte-level BPE tokenizer trained
with ``tokenizers`` on built-in text, with a ChatML chat template -- and then
loaded back through the ordinary ``from_pretrained`` path like any other
checkpoint. They need no network and build in about a second.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_PREFIX", "TINY_VARIANTS", "is_tiny", "materialize", "tiny_cache_dir", "write_tiny_checkpoint"]

TINY_PREFIX = "tiny:"
# Bump when the recipe changes so cached copies are rebuilt.
_RECIPE_VERSION = "20"

CORPUS = (
    "Hi dog how are you? Hello dog, how are you doing today? Hi, how are you doing today?",
    "Text generation is sequence classification in a for-loop.",
    "The model reads the previous text and gives a score to every token in the vocabulary.",
    "The token with the highest score is appended, and the loop runs again until the end.",
    "I had some beer from the pub. Today the weather feels warm and the sky is blue.",
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the dog.",
    "Once upon a time there was a small language model that wanted to be tested.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "One, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10.",
    "Who's that Pokemon? It is a yellow mouse with red cheeks.",
    "user\nHow are you?\nassistant\nI am fine, thank you. How can I help you today?",
)

CHATML_TEMPLATE = (
    "{{ bos_token if bos_token and add_bos_in_template else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# name -> recipe; sizes follow transformers' own tiny test models.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3": {
        "architecture": "qwen3",
        "tie_word_embeddings": True,
        "bos_token": None,
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "seed": 1234,
    },
    "llama": {
        "architecture": "llama",
        "tie_word_embeddings": False,
        "bos_token": "<|begin_of_text|>",
        "special_tokens": ["<|begin_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "seed": 4321,
    },
}

_VOCAB_SIZE = 384
# Wider than transformers' 0.02 so the random model's greedy choices have clear
# margins and its continuations vary instead of repeating one token.
_INITIALIZER_RANGE = 0.3


def is_tiny(checkpoint: str) -> bool:
    """True for the reserved ``tiny:NAME`` checkpoint names."""
    return checkpoint.startswith(TINY_PREFIX)


def tiny_cache_dir() -> Path:
    """Where built tiny checkpoints are kept: ``$CAUSAL_LM_TINY_DIR`` or the user cache."""
    if os.environ.get("CAUSAL_LM_TINY_DIR"):
        return Path(os.environ["CAUSAL_LM_TINY_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-causal-lm" / "tiny"


def _train_tokenizer(recipe: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE - 8,  # room for added tokens below config.vocab_size
        special_tokens=recipe["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    bos = recipe["bos_token"]
    if bos:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=recipe["eos_token"],
        pad_token=recipe["pad_token"],
        padding_side="left",
        chat_template=CHATML_TEMPLATE.replace("add_bos_in_template", "true" if bos else "false"),
    )
    # Added (non-special) tokens, as real chat models have: they must stay below vocab_size too.
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def _build_model(recipe: dict[str, Any], tokenizer: Any) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {
        f"{kind}_token_id": tokenizer.convert_tokens_to_ids(token) if token else None
        for kind, token in (
            ("bos", recipe["bos_token"]),
            ("eos", recipe["eos_token"]),
            ("pad", recipe["pad_token"]),
        )
    }
    config = AutoConfig.for_model(
        recipe["architecture"],
        vocab_size=_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=recipe["tie_word_embeddings"],
        initializer_range=_INITIALIZER_RANGE,
        **ids,
    )
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    return model


# Sizes every architecture is asked for; each config maps the standard names to its own.
_TINY_SIZES: dict[str, Any] = {
    "vocab_size": _VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
    # a window the long-context invariant crosses in 72 tokens; the other invariants' prompts (up to 27 tokens)
    # plus what they generate reach it too
    "sliding_window": 32,
    "attention_chunk_size": 32,  # Llama 4's chunked attention, crossed the same way
    "initializer_range": _INITIALIZER_RANGE,
    # mixture-of-experts, multi-latent attention, state-space and hybrid models
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "conv_kernel": 4,
    "expand": 2,
    "is_decoder": True,
    "causal": True,  # XLM: the causal-LM variant, as its CLM checkpoints set it
}
MAX_TINY_PARAMETERS = 10_000_000

# What the standard names above cannot say: each entry is needed for that architecture to build small
# (a validator, a per-layer pattern, a dimension the standard names do not reach) or to hold a full-attention
# layer in its few layers. Keys are the model_type of the config or sub-config they apply to.
_MLA = {"num_key_value_heads": 4}  # multi-latent attention expands keys to every head
_ENCODER_DECODER = {"decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64}
_HYBRID_FOUR_LAYERS = {"num_hidden_layers": 4}  # one full-attention layer among linear-attention ones
# Recurrent stacks amplify the wide random init until float32 rounding alone (3e-4 to 8e-4) exceeds the
# tolerance; a real bug stays far above it at this scale (prophetnet's leak: 0.07).
_GENTLER_INIT = {"initializer_range": 0.1}
# per-layer embeddings sized to the tiny vocabulary; no per-layer head sizes
_GEMMA4_PER_LAYER = {
    "vocab_size_per_layer_input": _VOCAB_SIZE,
    "hidden_size_per_layer_input": 8,
    "per_layer_config": {},
}
_ARCHITECTURE_SIZES: dict[str, dict[str, Any]] = {
    **dict.fromkeys(
        [
            "axk2",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "minicpm3",
            "sarvam_mla",
            "youtu",
        ],
        _MLA,
    ),
    **dict.fromkeys(
        ["bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart"],
        _ENCODER_DECODER,
    ),
    "whisper": {**_ENCODER_DECODER, "encoder_layers": 2},
    "prophetnet": {
        "num_encoder_layers": 2,
        "init_std": 0.1,  # its own name for the init; at its default 0.02 its causality leak looked like rounding (2e-4)
        "num_decoder_layers": 2,
        "num_decoder_attention_heads": 4,
        "decoder_ffn_dim": 64,
        "encoder_ffn_dim": 64,
    },
    "axk1": {**_MLA, "n_group": 1, "topk_group": 1},  # one group of the four experts
    **dict.fromkeys(["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "lfm3", "recurrent_gemma"], _HYBRID_FOUR_LAYERS),
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "codegen": {"rotary_dim": 4},  # rotary dims live inside one 8-wide head
    "gptj": {"rotary_dim": 4},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 256},
    "xlnet": {"d_head": 8, "d_inner": 64},
    "mamba2": {"num_heads": 8, "head_dim": 8, "n_groups": 1},
    # its float32 rounding alone reached 9e-5 between static-cache generation and a forward at the wide init
    "zaya": {"num_experts_per_tok": 1, **_GENTLER_INIT},
    "zamba": {  # the shared transformer block is tied across hybrid layers: it needs two of them
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "hybrid"] * 2,
        "attention_head_dim": 16,
        "n_mamba_heads": 2,
        "initializer_range": 0.05,  # gentler still: 0.1 left a 1.5e-4 chunked-prefill rounding difference
    },
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_state": 8},  # full-size SSM: 70 s a run
    "xmod": {"default_language": "en_XX"},  # which language adapter to run
    "rembert": {"input_embedding_size": 32, "output_embedding_size": 32},
    **dict.fromkeys(["hrm_text", "nemotron_h"], _GENTLER_INIT),
    "dots3_note_text": {"num_key_value_heads": 4, "per_layer_config": {}},
    "bamba": {"mamba_n_heads": 8, "mamba_d_head": 8, "mamba_n_groups": 1, "attn_layer_indices": [1]},
    "granitemoehybrid": {
        "mamba_n_heads": 8,
        "mamba_d_head": 8,
        "mamba_n_groups": 1,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "bailing_hybrid": {
        **_MLA,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "n_group": 1,
        "topk_group": 1,
    },
    "kimi_linear": {
        **_MLA,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "linear_head_dim": 8,
        "linear_num_heads": 4,
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "dots1": {"n_shared_experts": 1},
    # input, recurrent and output blocks must add up to the layers: one, two looped, one
    "dory": {"num_hidden_layers": 4, "n_input_layers": 1, "n_output_layers": 1},
    # the head's unpadded size, a separate field from 5.25 (its default, 200058, outgrows the tiny vocabulary)
    **{name: {"unpadded_vocab_size": _VOCAB_SIZE} for name in ("inkling2_text", "inkling2_loop_text")},
    "cohere_compass_text": {  # its default config names no RoPE parameters per layer type
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            kind: {"rope_type": "default", "rope_theta": 10_000.0} for kind in ("sliding_attention", "full_attention")
        },
    },
    "longcat_flash": {**_MLA, "num_layers": 2, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32},
    "roc_bert": {
        "pronunciation_vocab_size": 64,
        "shape_vocab_size": 64,
        "pronunciation_embed_dim": 8,
        "shape_embed_dim": 8,
    },
    "reformer": {
        "axial_pos_shape": [16, 32],
        "axial_pos_embds_dim": [16, 16],
        "attention_head_size": 8,
        "feed_forward_size": 64,
        "attn_layers": ["local", "local"],
    },
    "gemma3n_text": {
        "num_kv_shared_layers": 0,
        "vocab_size_per_layer_input": 384,
        "hidden_size_per_layer_input": 8,
        "laurel_rank": 8,
        "activation_sparsity_pattern": [0.0, 0.0],
    },
    **dict.fromkeys(["gemma4_text", "gemma4_unified_text"], _GEMMA4_PER_LAYER),
    "qwen4_exp_text": {
        "num_hidden_layers": 4,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "hc_lowrank": 8,
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "ple_embed_dim": 16,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
    },
}


class TinyBuildError(Exception):
    """An architecture could not be built as a tiny model on CPU; the message says why."""


def _described(exc: BaseException) -> str:
    """One short line for an exception: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _accepted_keys(config_class: type) -> set[str]:
    return set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)


def _tiny_sizes(config_class: type, model_type: str) -> dict[str, Any]:
    """The standard tiny sizes this config understands, then its own overrides.

    Only what the architecture understands: a stray attribute (num_key_value_heads
    on GPT-2) would describe a model that does not exist.
    """
    accepted = _accepted_keys(config_class)
    sizes = {key: value for key, value in _TINY_SIZES.items() if key in accepted or key == "is_decoder"}
    sizes.update(copy.deepcopy(_ARCHITECTURE_SIZES.get(model_type, {})))
    return sizes


def _special_ids(config_class: type, specials: dict[str, int | None]) -> dict[str, int | None]:
    """The tokenizer's special ids for this config; where its field must be an int, a missing BOS becomes EOS."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    accepted = _accepted_keys(config_class)

    def none_allowed(key: str) -> bool:
        field = fields.get(key)
        return field is None or "None" in str(field.type) or "Optional" in str(field.type)

    return {
        key: value if value is not None or none_allowed(key) else specials["eos_token_id"]
        for key, value in specials.items()
        if key in accepted
    }


def _tiny_config(model_type: str, specials: dict[str, int | None]) -> Any:
    """The architecture's config at tiny sizes; composite (multimodal) configs get tiny sub-configs too."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    sizes = _tiny_sizes(config_class, model_type)
    sub_configs = getattr(config_class, "sub_configs", {}) or {}
    if sub_configs:
        default = config_class()
        try:
            text = default.get_text_config()
        except ValueError:  # several text configs (MusicGen's text encoder and decoder): no single one to shrink
            text = None
        text_key = next((key for key in sub_configs if text is not None and getattr(default, key, None) is text), None)
        for key in sub_configs:
            sub = getattr(default, key, None)
            if sub is None or not hasattr(sub, "to_dict"):
                continue
            sub_sizes = _tiny_sizes(type(sub), sub.model_type)
            if key == text_key:
                sub_sizes.update(_special_ids(type(sub), specials))
            sizes[key] = {"model_type": sub.model_type, **sub_sizes}
    sizes.update(_special_ids(config_class, specials))
    return config_class(**sizes)


def _build_any_architecture(model_type: str, tokenizer: Any) -> tuple[Any, Any]:
    """A tiny random causal LM of any architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, and the config it was
    built from (composite for multimodal wrappers, whose causal-LM class may keep only the text part)."""
    import torch
    from transformers import AutoModelForCausalLM

    specials = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    try:
        config = _tiny_config(model_type, specials)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise TinyBuildError(f"{model_type}: {_described(exc)}") from exc
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_TINY_PARAMETERS:
        raise TinyBuildError(f"{model_type}: {count:,} parameters after shrinking (limit {MAX_TINY_PARAMETERS:,})")
    model.generation_config.do_sample = False
    for name, value in specials.items():  # as a chat checkpoint ships it: generate stops at the turn terminator
        if getattr(model.generation_config, name, None) is None:
            setattr(model.generation_config, name, value)
    _ids_inside_vocabulary(
        model.generation_config, len(tokenizer), specials["bos_token_id"] or specials["eos_token_id"]
    )
    return model, config


def _ids_inside_vocabulary(generation_config: Any, vocab_size: int, fallback: int) -> None:
    """The architecture's default generation ids (Whisper's decoder start 50257, its suppressed tokens) name
    tokens of its full vocabulary; mapped into the tiny one, as a real checkpoint's ids lie inside its own."""
    for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(generation_config, name, None)
        if isinstance(value, int) and not 0 <= value < vocab_size:
            setattr(generation_config, name, fallback)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        value = getattr(generation_config, name, None)
        if value:
            setattr(generation_config, name, [i for i in value if 0 <= i < vocab_size] or None)


def write_tiny_checkpoint(name: str, directory: str | os.PathLike[str]) -> Path:
    """Build the tiny checkpoint ``name`` into ``directory``.

    ``qwen3`` and ``llama`` have their own recipes; any other name is a
    transformers ``model_type`` built small with the qwen3 tokenizer.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    built_from = None
    if name in TINY_VARIANTS:
        recipe = TINY_VARIANTS[name]
        tokenizer = _train_tokenizer(recipe)
        model = _build_model(recipe, tokenizer)
    elif name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        tokenizer = _train_tokenizer(TINY_VARIANTS["qwen3"])
        model, built_from = _build_any_architecture(name, tokenizer)
    else:
        raise ValueError(
            f"unknown tiny checkpoint {name!r}; choose from {', '.join(TINY_VARIANTS)} "
            "or a model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
        )
    target = Path(directory)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if built_from is not None:
        _save_loadable_config(name, model, built_from, target)
    return target


def _save_loadable_config(model_type: str, model: Any, built_from: Any, target: Path) -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(target)`` rebuild ``model`` exactly, or raise TinyBuildError.

    Some causal-LM classes (Mllama's) save only their text sub-config, whose
    model_type AutoModelForCausalLM does not map; the composite config loads instead.
    """
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 11)[None]
    try:
        with torch.no_grad():
            built_logits = model.eval()(input_ids=ids).logits
    except Exception as exc:
        raise TinyBuildError(f"{model_type}: the tiny model's forward fails: {_described(exc)}") from exc

    def reload_difference() -> float:
        reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        with torch.no_grad():
            return float((built_logits - reloaded.eval()(input_ids=ids).logits).abs().max())

    try:
        try:
            difference = reload_difference()
        except Exception:
            if type(built_from) is type(model.config):
                raise
            built_from.save_pretrained(target)  # the composite config, which AutoModelForCausalLM maps
            difference = reload_difference()
    except Exception as exc:
        raise TinyBuildError(
            f"{model_type}: AutoModelForCausalLM cannot load the saved checkpoint back: {_described(exc)}"
        ) from exc
    if difference > 1e-5:
        raise TinyBuildError(
            f"{model_type}: the saved checkpoint does not load back as the model that was built "
            f"(logits differ by {difference:.3g}; some weights are not restored by from_pretrained)"
        )


def _versioned_name(name: str) -> str:
    import transformers

    stamp = hashlib.sha1(f"{_RECIPE_VERSION}|{transformers.__version__}".encode()).hexdigest()[:10]
    return f"{name}-{stamp}"


def materialize(checkpoint: str) -> Path:
    """Return the directory of a ``tiny:NAME`` checkpoint, building it on first use.

    The build goes to a temporary directory that is renamed into place, so
    concurrent workers (pytest-xdist) never see a half-written checkpoint.
    """
    name = checkpoint.removeprefix(TINY_PREFIX)
    root = tiny_cache_dir()
    final = root / _versioned_name(name)
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write_tiny_checkpoint(name, staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
