"""Tiny, deterministic, real-format checkpoints built offline.

``tiny:qwen3`` (tied embeddings) and ``tiny:llama`` (separate ``lm_head``,
tokenizer that adds BOS) are written with ``save_pretrained`` -- config,
safetensors weights, generation config and a byte-level BPE tokenizer trained
with ``tokenizers`` on built-in text, with a ChatML chat template -- and then
loaded back through the ordinary ``from_pretrained`` path like any other
checkpoint. They need no network and build in about a second.
"""

from __future__ import annotations

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
_RECIPE_VERSION = "3"

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
MAX_TINY_PARAMETERS = 5_000_000
# Hybrid models interleave linear-attention or recurrent layers with full attention: two layers hold no full one.
_HYBRID_LAYERS = {"qwen3_next": 4, "qwen3_5_text": 4, "lfm3": 4, "recurrent_gemma": 4}


class TinyBuildError(Exception):
    """An architecture could not be built as a tiny model on CPU; the message says why."""


def _build_any_architecture(model_type: str, tokenizer: Any) -> Any:
    """A tiny random causal LM of any architecture transformers maps in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    specials = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    try:
        config_class = type(AutoConfig.for_model(model_type))
        accepted = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
        # only what this architecture understands: a stray attribute (num_key_value_heads on GPT-2)
        # would describe a model that does not exist
        sizes = {key: value for key, value in _TINY_SIZES.items() if key in accepted or key == "is_decoder"}
        if model_type in _HYBRID_LAYERS:
            sizes["num_hidden_layers"] = _HYBRID_LAYERS[model_type]
        config = config_class(**sizes, **specials)
        text = config.get_text_config()
        if text is not config:  # multimodal wrapper: shrink its decoder the same way
            for key, value in {**_TINY_SIZES, **specials}.items():
                if hasattr(text, key):
                    setattr(text, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise TinyBuildError(f"{model_type}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_TINY_PARAMETERS:
        raise TinyBuildError(f"{model_type}: {count:,} parameters after shrinking (limit {MAX_TINY_PARAMETERS:,})")
    model.generation_config.do_sample = False
    return model


def write_tiny_checkpoint(name: str, directory: str | os.PathLike[str]) -> Path:
    """Build the tiny checkpoint ``name`` into ``directory``.

    ``qwen3`` and ``llama`` have their own recipes; any other name is a
    transformers ``model_type`` built small with the qwen3 tokenizer.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name in TINY_VARIANTS:
        recipe = TINY_VARIANTS[name]
        tokenizer = _train_tokenizer(recipe)
        model = _build_model(recipe, tokenizer)
    elif name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        tokenizer = _train_tokenizer(TINY_VARIANTS["qwen3"])
        model = _build_any_architecture(name, tokenizer)
    else:
        raise ValueError(
            f"unknown tiny checkpoint {name!r}; choose from {', '.join(TINY_VARIANTS)} "
            "or a model_type of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
        )
    target = Path(directory)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


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
