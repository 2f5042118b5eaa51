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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_PREFIX", "TINY_VARIANTS", "is_tiny", "materialize", "tiny_cache_dir", "write_tiny_checkpoint"]

TINY_PREFIX = "tiny:"
# Bump when the recipe changes so cached copies are rebuilt.
_RECIPE_VERSION = "1"

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


def write_tiny_checkpoint(name: str, directory: str | os.PathLike[str]) -> Path:
    """Build the tiny checkpoint ``name`` (``qwen3`` or ``llama``) into ``directory``."""
    if name not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny checkpoint {name!r}; choose from {', '.join(TINY_VARIANTS)}")
    recipe = TINY_VARIANTS[name]
    tokenizer = _train_tokenizer(recipe)
    model = _build_model(recipe, tokenizer)
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
    if name not in TINY_VARIANTS:
        raise ValueError(
            f"unknown built-in checkpoint {checkpoint!r}; choose from "
            + ", ".join(TINY_PREFIX + n for n in TINY_VARIANTS)
        )
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
