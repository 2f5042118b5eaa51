"""Deliberately broken models: each has one realistic bug that one invariant must catch.

They start from a healthy tiny checkpoint and change one thing, the way a
custom kernel, a conversion script or hand-written modeling code goes wrong.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states.repeat_interleave(groups, dim=1) if groups > 1 else states


def _leaky_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A custom kernel with an off-by-one causal mask: position i also sees position i+1."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len + 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _always_dropout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A custom kernel that applies attention dropout regardless of eval()."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling, dropout_p=0.2)
    return out.transpose(1, 2).contiguous(), None


for _name, _function in (("leaky_causal", _leaky_attention), ("always_dropout", _always_dropout_attention)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)


def load_healthy(path: Any, **kwargs: Any) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)


def leaky_mask(path: Any) -> tuple[Any, Any]:
    return load_healthy(path, attn_implementation="leaky_causal")


def dropout_left_on(path: Any) -> tuple[Any, Any]:
    return load_healthy(path, attn_implementation="always_dropout")


def nan_logits(path: Any, position: int = 2, token_id: int = 7) -> tuple[Any, Any]:
    """An unstable final transform that turns one score into NaN."""
    model, tokenizer = load_healthy(path)

    def poison(module, inputs, output):
        if output.shape[1] > position:
            output = output.clone()
            output[:, position, token_id] = float("nan")
        return output

    model.get_output_embeddings().register_forward_hook(poison)
    return model, tokenizer


def last_row_only(path: Any) -> tuple[Any, Any]:
    """An "optimised" head that always computes the last position's scores only."""
    model, tokenizer = load_healthy(path)
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
    return model, tokenizer


def first_row_kept(path: Any) -> tuple[Any, Any]:
    """logits_to_keep slices from the wrong end: keeps the first rows instead of the last."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(*args: Any, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        out = original(*args, logits_to_keep=0, **kwargs)
        if logits_to_keep:
            out.logits = out.logits[:, :logits_to_keep]
        return out

    model.forward = forward
    return model, tokenizer


def tokenizer_overruns_vocab(path: Any) -> tuple[Any, Any]:
    """Tokens added to the tokenizer without resize_token_embeddings."""
    model, tokenizer = load_healthy(path)
    needed = model.config.vocab_size - len(tokenizer) + 3
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(needed)])
    return model, tokenizer


def short_lm_head(path: Any) -> tuple[Any, Any]:
    """A conversion that dropped the padded rows of lm_head."""
    model, tokenizer = load_healthy(path)
    head = model.get_output_embeddings()
    rows = len(tokenizer)
    short = torch.nn.Linear(head.in_features, rows, bias=False)
    short.weight.data.copy_(head.weight.data[:rows])
    model.lm_head = short
    return model, tokenizer


def mismatched_eos(path: Any) -> tuple[Any, Any]:
    """generation_config stops at a different token than the tokenizer's eos."""
    model, tokenizer = load_healthy(path)
    model.generation_config.eos_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.pad_token_id
    return model, tokenizer
