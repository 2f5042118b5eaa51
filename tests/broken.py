"""Deliberately broken models: each has one realistic bug that one invariant must catch.

They start from a healthy tiny checkpoint and change one thing, the way a
custom kernel, a conversion script or hand-written modeling code goes wrong.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states.repeat_interleave(groups, dim=1) if groups > 1 else states


def _register(**kernels: Any) -> None:
    """Register each custom attention kernel under its name, with sdpa's mask."""
    for name, function in kernels.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def _under_kernel(path: Any, kernel: str, dtype: Any) -> tuple[Any, Any]:
    """The healthy checkpoint run by a registered custom attention kernel, in ``dtype``."""
    model, tokenizer = load_healthy(path, attn_implementation=kernel)
    return model.to(dtype), tokenizer


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


_register(leaky_causal=_leaky_attention, always_dropout=_always_dropout_attention)


def _require_internal(model: Any, method: str, parameter: str | None = None) -> None:
    """These broken models patch generate's internals, which changed within 5.x: where the installed version
    lacks the one patched, the broken model cannot be built the way the bug arrives, and its test skips."""
    found = getattr(type(model), method, None)
    if found is None or (parameter is not None and parameter not in inspect.signature(found).parameters):
        import transformers

        pytest.skip(
            f"this broken model patches {method}({parameter or '...'}), which transformers "
            f"{transformers.__version__} does not have"
        )


def cache_in(kwargs: dict, pop: bool = False) -> Any:
    """The cache a wrapped forward or prepare_inputs_for_generation was given, under either name: transformers
    5.24 renamed ``past_key_values`` to ``cache``."""
    take = kwargs.pop if pop else kwargs.get
    found = [take(name, None) for name in ("cache", "past_key_values")]
    return next((value for value in found if value is not None), None)


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


def _no_padding_mask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A custom kernel that is causal but ignores the padding mask it is given."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _decode_ignores_padding_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A fast decode path that assumes no padding: the mask is honoured in prefill, dropped for cached steps."""
    if query.shape[2] < key.shape[2]:
        return _no_padding_mask_attention(module, query, key, value, None, scaling=scaling)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = attention_mask is None and query.shape[2] > 1  # transformers drops the mask when causal suffices
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_register(no_padding_mask=_no_padding_mask_attention, decode_ignores_padding=_decode_ignores_padding_attention)


def _sdpa(query, key, value, attention_mask, scaling):
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _large_batch_drops_padding_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """A kernel that switches to a batched path above 8 rows, and that path ignores the padding mask."""
    if query.shape[0] > 8:
        return _no_padding_mask_attention(module, query, key, value, None, scaling=scaling)
    return _sdpa(query, key, value, attention_mask, scaling)


def _large_batch_in_bfloat16_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A kernel whose batched path above 8 rows computes attention in bfloat16 whatever the model's dtype."""
    if query.shape[0] > 8 and query.dtype != torch.bfloat16:
        half = [t.to(torch.bfloat16) for t in (query, key, value)]
        mask = (
            attention_mask
            if attention_mask is None or attention_mask.dtype == torch.bool
            else attention_mask.to(torch.bfloat16)
        )
        out, _ = _sdpa(*half, mask, scaling)
        return out.to(query.dtype), None
    return _sdpa(query, key, value, attention_mask, scaling)


_register(
    large_batch_drops_padding=_large_batch_drops_padding_attention,
    large_batch_in_bfloat16=_large_batch_in_bfloat16_attention,
)


def _tiled_prefill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A memory-saving path for prompts over 256 tokens: queries in tiles of 128, each tile's causal mask built
    with the whole call's offset (``k_len - q_len``) instead of the tile's own start, so every tile past the
    first sees keys as if it began the sequence. Shorter calls (and every chunk of a chunked prefill) use sdpa."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len <= 256:
        return _sdpa(query, key, value, attention_mask, scaling)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    tiles = []
    for start in range(0, q_len, 128):
        tile = query[:, :, start : start + 128]
        causal = torch.ones(tile.shape[2], k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
        tiles.append(F.scaled_dot_product_attention(tile, key, value, attn_mask=causal, scale=scaling))
    return torch.cat(tiles, dim=2).transpose(1, 2).contiguous(), None


def _split_keys_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash-decoding for cached steps over more than 256 keys: keys in blocks of 256, each block's softmax
    taken against its own maximum, and the blocks combined by their sums without rescaling them to a common
    maximum (the rescale the split-K trick needs)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len > 1 or k_len <= 256:
        return _sdpa(query, key, value, attention_mask, scaling)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = (query @ key.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = (
            scores.masked_fill(~attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool
            else scores + attention_mask
        )
    outputs, sums = [], []
    for start in range(0, k_len, 256):
        block = scores[..., start : start + 256]
        weights = (block - block.amax(-1, keepdim=True)).exp()
        outputs.append(weights @ value[:, :, start : start + 256].float())
        sums.append(weights.sum(-1, keepdim=True))
    out = (sum(outputs) / sum(sums)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


_register(tiled_prefill=_tiled_prefill_attention, split_keys_decode=_split_keys_decode_attention)


def _batched_decode_drops_padding_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """A serving kernel for cached steps of batches over 8 rows that assumes no row is padded (it builds its own
    causal mask); a prefill, and any smaller batch, honour the padding mask."""
    if query.shape[0] > 8 and query.shape[2] < key.shape[2]:
        return _no_padding_mask_attention(module, query, key, value, None, scaling=scaling)
    return _sdpa(query, key, value, attention_mask, scaling)


_register(batched_decode_drops_padding=_batched_decode_drops_padding_attention)


def _key_padding_vector_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A kernel that takes padding as one vector over the keys per row (as flash-attn's ``key_padding_mask`` and
    many serving kernels do), read from the mask's last query, and applies causality itself: right for padded
    batches and cached steps, wrong for a packed row, whose last query sees its own sequence only."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, :, -1:, :].bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query with no key (a pad) sees them all, as torch's fix
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def long_keys_sdpa_drops_padding(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An sdpa path that switches past 256 keys to a memory-efficient kernel taking no mask (causal only), so
    left padding is ignored there: right for short batches and for one long row."""
    if key.shape[2] > 256:
        return _no_padding_mask_attention(module, query, key, value, None, scaling=scaling)
    return _sdpa(query, key, value, attention_mask, scaling)


_register(key_padding_vector=_key_padding_vector_attention)


def packed_rows_read_as_padding(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    return _under_kernel(path, "key_padding_vector", dtype)


def positions_filled_in_for_left_padding(path: Any) -> tuple[Any, Any]:
    """A port's forward that fills in missing ``position_ids`` from the attention mask as if every batch were
    left-padded (each row's positions start after its pads): right for generate's batches, wrong for a batch
    padded on the right, as ``tokenizer(texts, padding=True)`` pads by default, whose rows start at minus their
    padding (clamped to 0)."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            width = attention_mask.shape[1]
            pads = width - attention_mask.sum(-1, keepdim=True)
            position_ids = (torch.arange(width, device=attention_mask.device)[None] - pads).clamp(min=0)
            position_ids = position_ids[:, width - input_ids.shape[1] :] if input_ids is not None else position_ids
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    model.forward = forward
    return model, tokenizer


def batched_decode_drops_padding(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    return _under_kernel(path, "batched_decode_drops_padding", dtype)


def tiled_prefill_offset_forgotten(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    return _under_kernel(path, "tiled_prefill", dtype)


def split_keys_decode_without_rescale(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    return _under_kernel(path, "split_keys_decode", dtype)


def large_batch_drops_padding(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    return _under_kernel(path, "large_batch_drops_padding", dtype)


def large_batch_in_bfloat16(path: Any) -> tuple[Any, Any]:
    return load_healthy(path, attn_implementation="large_batch_in_bfloat16")


def padding_mask_ignored(path: Any) -> tuple[Any, Any]:
    return load_healthy(path, attn_implementation="no_padding_mask")


def decode_ignores_padding(path: Any) -> tuple[Any, Any]:
    return load_healthy(path, attn_implementation="decode_ignores_padding")


def cache_drops_newest_key(path: Any, layer: int = 1) -> tuple[Any, Any]:
    """A cache update that loses the newest key/value of one layer after every forward."""
    model, tokenizer = load_healthy(path)

    def drop(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if cache is not None and cache.layers[layer].keys is not None and cache.layers[layer].keys.shape[2] > 1:
            cache.layers[layer].keys = cache.layers[layer].keys[:, :, :-1]
            cache.layers[layer].values = cache.layers[layer].values[:, :, :-1]
        return output

    model.register_forward_hook(drop, with_kwargs=True)
    return model, tokenizer


def cache_stored_in_half_precision(path: Any, dtype: Any = torch.float16) -> tuple[Any, Any]:
    """A port whose KV cache keeps keys and values in ``dtype`` (a cache dtype left from a half-precision
    conversion) while the model runs in float32: cached steps attend to rounded keys and values, an error of
    about 1e-3 of a logit that float32's calibrated tolerance must still catch."""
    model, tokenizer = load_healthy(path)

    def round_cache(module, args, kwargs, output):
        cache = cache_in(dict(output)) if hasattr(output, "keys") else None
        for layer in getattr(cache, "layers", []):
            if getattr(layer, "keys", None) is not None and layer.keys.dtype != dtype:
                layer.keys = layer.keys.to(dtype).to(layer.keys.dtype)
                layer.values = layer.values.to(dtype).to(layer.values.dtype)
        return output

    model.register_forward_hook(round_cache, with_kwargs=True)
    return model, tokenizer


def positions_restart_with_cache(path: Any) -> tuple[Any, Any]:
    """Positions counted from 0 for the new tokens instead of from the cache length."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(input_ids=None, position_ids=None, **kwargs):
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0 and input_ids is not None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(
                input_ids.shape[0], -1
            )
        return original(input_ids=input_ids, position_ids=position_ids, **kwargs)

    model.forward = forward
    return model, tokenizer


def cache_ignored_in_generate(path: Any) -> tuple[Any, Any]:
    """prepare_inputs_for_generation that neither slices the input nor passes the cache: every step recomputes."""
    model, tokenizer = load_healthy(path)
    _require_internal(model, "prepare_inputs_for_generation", "next_sequence_length")
    original = model.prepare_inputs_for_generation

    def prepare(input_ids, next_sequence_length=None, **kwargs):
        kwargs.pop("position_ids", None)
        cache_in(kwargs, pop=True)
        return original(input_ids, next_sequence_length=None, **kwargs)

    model.prepare_inputs_for_generation = prepare
    return model, tokenizer


def generate_feeds_previous_token(path: Any) -> tuple[Any, Any]:
    """An off-by-one slice in prepare_inputs_for_generation: decoding steps feed the previous token."""
    model, tokenizer = load_healthy(path)
    _require_internal(model, "prepare_inputs_for_generation", "next_sequence_length")
    original = model.prepare_inputs_for_generation

    def prepare(input_ids, next_sequence_length=None, **kwargs):
        inputs = original(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        if next_sequence_length == 1:
            inputs["input_ids"] = input_ids[:, -2:-1].clone()
        return inputs

    model.prepare_inputs_for_generation = prepare
    return model, tokenizer


def lm_head_with_bias(path: Any) -> tuple[Any, Any]:
    """A causal head with a bias the score head (which maps lm_head.weight only) lacks."""
    model, tokenizer = load_healthy(path)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.linspace(-1.0, 1.0, head.out_features))
    model.lm_head = biased
    return model, tokenizer


def soft_capped_head(path: Any, cap: float = 0.5) -> tuple[Any, Any]:
    """A head that soft-caps its scores, declared in the config as Gemma 2 does."""
    model, tokenizer = load_healthy(path)
    model.config.final_logit_softcapping = cap
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: torch.tanh(output / cap) * cap)
    return model, tokenizer


def rows_coupled(path: Any) -> tuple[Any, Any]:
    """A normalisation that uses batch statistics at inference, so rows leak into each other."""
    model, tokenizer = load_healthy(path)

    def couple(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        coupled = hidden - hidden.mean(dim=0, keepdim=True) + hidden
        return (coupled, *output[1:]) if isinstance(output, tuple) else coupled

    model.model.layers[0].register_forward_hook(couple)
    return model, tokenizer


def with_chat_template(path: Any, edit) -> tuple[Any, Any]:
    """The healthy model with its tokenizer's chat template rewritten by ``edit``."""
    model, tokenizer = load_healthy(path)
    tokenizer.chat_template = edit(tokenizer.chat_template)
    return model, tokenizer


def rmsnorm_without_upcast(path: Any, channel: int = 5, scale: float = 3000.0) -> tuple[Any, Any]:
    """A port whose RMSNorm squares the hidden states in the run dtype instead of float32, on a model with one
    large residual channel (real LLMs have a few): fine in float32 and bfloat16, overflows in float16."""
    model, tokenizer = load_healthy(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] *= scale  # a massive-activation channel

    def forward(self, hidden_states):  # transformers' LlamaRMSNorm, without `.to(torch.float32)`
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)
    model.config.dtype = torch.float16  # the checkpoint ships in float16
    return model, tokenizer


def _sdpa_without_scale(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A port's sdpa call that drops ``scale=``: right only where the model's scaling is 1/sqrt(head_dim)."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


_register(sdpa_without_scale=_sdpa_without_scale)


def sdpa_forgets_the_scale(granite_path: Any) -> tuple[Any, Any]:
    """Granite (attention_multiplier instead of 1/sqrt(head_dim)) under a kernel that forgets the scale."""
    return load_healthy(granite_path, attn_implementation="sdpa_without_scale")


def longrope_switches_per_call(path: Any, original: int = 64) -> tuple[Any, Any]:
    """A config edit that extends the context Phi-3 style: longrope with an original context of ``original``.
    Its frequencies follow each call's length, so a cache filled by shorter calls disagrees with one long pass."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10_000.0,
        "short_factor": [1.0] * 4,
        "long_factor": [4.0] * 4,
        "original_max_position_embeddings": original,
    }
    return load_healthy(path, rope_parameters=rope)


def static_cache_reused_without_reset(path: Any, allocated: int = 256) -> tuple[Any, Any]:
    """A port that allocates its static cache once and reuses it, zeroing the tensors but not the write
    position: the second generate call writes after the first call's tokens."""
    model, tokenizer = load_healthy(path)
    _require_internal(model, "_prepare_static_cache")
    original = model._prepare_static_cache
    kept: dict[int, Any] = {}

    def prepare(cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        cache = kept.get(batch_size)
        if cache is None:
            cache = kept[batch_size] = original(cache_implementation, batch_size, allocated, *args, **kwargs)
        for layer in cache.layers:
            if layer.is_initialized:
                layer.keys.zero_()
                layer.values.zero_()
        return cache

    model._prepare_static_cache = prepare
    return model, tokenizer


def embedding_scale_on_ids_only(path: Any) -> tuple[Any, Any]:
    """A Gemma-style port that multiplies by sqrt(hidden_size) where it looks up input_ids, so embeddings
    passed as inputs_embeds arrive unscaled."""
    model, tokenizer = load_healthy(path)
    decoder = model.model
    original = decoder.forward
    normalizer = model.config.hidden_size**0.5

    def forward(input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = decoder.embed_tokens(input_ids) * normalizer
        return original(input_ids=None, inputs_embeds=inputs_embeds, **kwargs)

    decoder.forward = forward
    return model, tokenizer


def cached_steps_feed_one_token(path: Any) -> tuple[Any, Any]:
    """prepare_inputs_for_generation that assumes a step with a filled cache feeds one token: right for
    decoding, wrong when a new turn or proposed tokens are appended to a cached conversation."""
    model, tokenizer = load_healthy(path)
    _require_internal(model, "prepare_inputs_for_generation", "next_sequence_length")
    original = model.prepare_inputs_for_generation

    def prepare(input_ids, next_sequence_length=None, **kwargs):
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            next_sequence_length = 1
        return original(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    model.prepare_inputs_for_generation = prepare
    return model, tokenizer


def logits_to_keep_as_a_flag(path: Any) -> tuple[Any, Any]:
    """A head that reads logits_to_keep as "last row only": right for generate's 1, wrong for k > 1."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(*args: Any, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
        return original(
            *args, logits_to_keep=1 if isinstance(logits_to_keep, int) and logits_to_keep else logits_to_keep, **kwargs
        )

    model.forward = forward
    return model, tokenizer


def cache_crop_skips_a_layer(path: Any, layer: int = 1) -> tuple[Any, Any]:
    """A cache whose crop() misses one layer, as a port with its own layer type can: only decoding that
    rolls back rejected proposals (assisted, prompt lookup) keeps the stale keys."""
    model, tokenizer = load_healthy(path)

    def patch(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if cache is not None and not getattr(cache.layers[layer], "crop_patched", False):
            cache.layers[layer].crop = lambda max_length: None
            cache.layers[layer].crop_patched = True
        return output

    model.register_forward_hook(patch, with_kwargs=True)
    return model, tokenizer


# --- ports whose error on a path users take must fail, not skip (only transformers' own refusal skips) -------


def static_cache_slot_reserved(path: Any, error: type[Exception] = ValueError) -> tuple[Any, Any]:
    """A port's own bookkeeping of a static cache that reserves a slot for the token generated next, which
    generate never feeds: the last decoding step of a cache sized exactly raises ``error`` (ValueError from its
    bounds check, or IndexError from marking the slot in a list of max_cache_len entries)."""
    model, tokenizer = load_healthy(path)
    for layer in model.model.layers:
        attention = layer.self_attn

        def forward(hidden_states, *args, original=attention.forward, index=attention.layer_idx, **kwargs):
            cache = cache_in(kwargs)
            limit = getattr(cache.layers[index], "max_cache_len", None) if cache is not None else None
            if limit is not None:
                after = int(cache.get_seq_length(index)) + hidden_states.shape[1]
                if error is ValueError and after + 1 >= limit:
                    raise ValueError(f"static cache full: {after} of {limit} slots written, none left for the next")
                written = [False] * limit
                written[after + 1 if error is IndexError else 0] = True
            return original(hidden_states, *args, **kwargs)

        attention.forward = forward
    return model, tokenizer


def inputs_embeds_with_positions_given(path: Any, error: type[Exception] = ValueError) -> tuple[Any, Any]:
    """A port whose forward handles inputs_embeds only as its own callers pass them (no position_ids, a mask as long
    as the embeddings): generate(inputs_embeds=...) passes position_ids and gets ``error``: ValueError from the port's
    own argument check, or IndexError from taking the pooled state one past the last embedding (length, not - 1)."""
    model, tokenizer = load_healthy(path)
    original = model.model.forward

    def forward(input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, **kwargs):
        if inputs_embeds is not None and position_ids is not None:
            if error is ValueError:
                raise ValueError("position_ids cannot be combined with inputs_embeds: positions come from input_ids")
            inputs_embeds[:, inputs_embeds.shape[1]]
        return original(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )

    model.model.forward = forward
    return model, tokenizer


def cache_crop_with_a_sign_bug(path: Any, error: type[Exception] = ValueError) -> tuple[Any, Any]:
    """A port's own cache crop, which assisted and prompt-lookup decoding call after rejecting proposed tokens:
    ValueError from a sign bug (it computes the tokens to drop as kept - held, negative, and refuses that), or
    IndexError from looping over its layers 1..N."""
    model, tokenizer = load_healthy(path)

    def refusing(layer):
        def crop(max_length):
            drop = max_length - layer.get_seq_length()
            if drop < 0:
                raise ValueError(f"cannot drop a negative number of tokens ({drop}) from the cache")

        return crop

    def one_based(cache):
        def crop(max_length):
            for index in range(1, len(cache.layers) + 1):
                cache.layers[index].crop(max_length)

        return crop

    def patch(module, args, kwargs, output):
        cache = cache_in(dict(output)) if hasattr(output, "keys") else None
        if cache is not None and not getattr(cache, "crop_patched", False):
            if error is ValueError:
                for layer in cache.layers:
                    layer.crop = refusing(layer)
            else:
                cache.crop = one_based(cache)
            cache.crop_patched = True
        return output

    model.register_forward_hook(patch, with_kwargs=True)
    return model, tokenizer


# --- broken checkpoints: the files edited the way a conversion, a merge or a hand edit leaves them ------------


def _copy_checkpoint(path: Any, out: Any) -> Any:
    import shutil

    shutil.copytree(path, out, dirs_exist_ok=True)
    return out


def _edit_config(directory: Any, **changes: Any) -> None:
    import json

    config = directory / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}, indent=2))


def _rewrite_weights(directory: Any, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    save_file(edit(load_file(weights)), weights, metadata={"format": "pt"})


def qwen3_saved_under_a_llama_config(qwen3_path: Any, out: Any, shard_size: str | None = None) -> Any:
    """A conversion script wrote Qwen3 weights (sharded when ``shard_size`` is given) with a Llama config:
    Llama has no q_norm/k_norm, so the loader throws those trained tensors away."""
    if shard_size:
        model = AutoModelForCausalLM.from_pretrained(qwen3_path)
        model.save_pretrained(out, max_shard_size=shard_size)
        AutoTokenizer.from_pretrained(qwen3_path).save_pretrained(out)
    else:
        _copy_checkpoint(qwen3_path, out)
    _edit_config(out, architectures=["LlamaForCausalLM"], model_type="llama")
    return out


def head_dropped_by_conversion(llama_path: Any, out: Any) -> Any:
    """A converter that assumed tied embeddings skipped lm_head.weight of an untied model: the loader invents a
    random head."""
    _copy_checkpoint(llama_path, out)
    _rewrite_weights(out, lambda weights: {k: v for k, v in weights.items() if k != "lm_head.weight"})
    return out


def peft_prefix_left_in_keys(llama_path: Any, out: Any) -> Any:
    """A merged adapter saved with PEFT's ``base_model.model.`` prefix still on every key: nothing loads."""
    _copy_checkpoint(llama_path, out)
    _rewrite_weights(out, lambda weights: {f"base_model.model.{k}": v for k, v in weights.items()})
    return out


# --- broken trained models: SmolLM2's real weights, converted or re-uploaded the way it goes wrong ----------


def with_another_models_tokenizer(path: Any, other: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A re-upload that shipped the tokenizer of another model: every id means another token."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(other)


def rotary_permutation_forgotten(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A conversion from an interleaved-rotary (Meta-style) layout that forgot to permute q_proj/k_proj into
    transformers' half-split one (what convert_llama_weights_to_hf does): each head's rotary pairs are wrong."""
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(),
        AutoTokenizer.from_pretrained(path),
    )
    config = model.config

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        rows, columns = weight.shape
        return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)

    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.copy_(permute(attention.q_proj.weight, config.num_attention_heads))
            attention.k_proj.weight.copy_(permute(attention.k_proj.weight, config.num_key_value_heads))
    return model, tokenizer


def _interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows in the interleaved rotary layout (Meta's) instead of transformers' half-split one."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def rotary_permutation_forgotten_in_one_layer(path: Any, layer: int = 1, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A conversion script whose q/k permutation loop skipped one layer (its keys matched another name pattern):
    that layer's attention pairs the wrong rotary dimensions; every other layer is exact."""
    model, tokenizer = load_healthy(path)
    config, attention = model.config, model.model.layers[layer].self_attn
    with torch.no_grad():
        attention.q_proj.weight.copy_(_interleaved(attention.q_proj.weight, config.num_attention_heads))
        attention.k_proj.weight.copy_(_interleaved(attention.k_proj.weight, config.num_key_value_heads))
    return model.to(dtype), tokenizer


def norm_weight_shifted_in_one_layer(path: Any, layer: int = 1, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A conversion that added Gemma's ``1 +`` norm offset to one layer's post-attention norm weight (a norm
    stored as an offset in one format and as a scale in the other, converted for one layer twice)."""
    model, tokenizer = load_healthy(path)
    with torch.no_grad():
        model.model.layers[layer].post_attention_layernorm.weight.add_(1.0)
    return model.to(dtype), tokenizer


def _edit_generation_config(directory: Any, **changes: Any) -> None:
    import json

    path = directory / "generation_config.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**saved, **changes}, indent=2))


def temperature_zero_for_greedy(path: Any, out: Any) -> Any:
    """generation_config.json written with OpenAI's spelling of greedy: sampling on, temperature 0."""
    _copy_checkpoint(path, out)
    _edit_generation_config(out, do_sample=True, temperature=0.0)
    return out


def sampling_settings_without_sampling(path: Any, out: Any) -> Any:
    """A fine-tune saved the sampling settings it was evaluated with, but not do_sample: they are ignored."""
    _copy_checkpoint(path, out)
    _edit_generation_config(out, do_sample=False, temperature=0.6, top_p=0.9)
    return out


def stop_id_of_another_model(path: Any, out: Any) -> Any:
    """generation_config.json copied from Llama 3: its eos ids do not exist in this vocabulary."""
    _copy_checkpoint(path, out)
    _edit_generation_config(out, eos_token_id=[128001, 128009])
    return out


def rotary_table_for_a_shorter_context(path: Any, positions: int = 64, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port that precomputes the rotary cos/sin table for ``positions`` positions (as older modeling code
    cached it) and indexes it with positions clamped to the table: every later position reuses the last row."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)
    rotary = model.model.rotary_emb
    original = rotary.forward

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(x, position_ids.clamp(max=positions - 1), *args, **kwargs)

    rotary.forward = forward
    return model, tokenizer


def position_rows_overflowed_in_export(gpt2_path: Any, out: Any, first_row: int = 300) -> Any:
    """A float16 export of learned position embeddings whose untrained far rows held values past float16's
    range: they were written as inf."""
    _copy_checkpoint(gpt2_path, out)

    def overflow(weights: dict) -> dict:
        table = weights["transformer.wpe.weight"].clone()
        table[first_row:] = float("inf")
        return {**weights, "transformer.wpe.weight": table}

    _rewrite_weights(out, overflow)
    return out


# --- broken tensor-parallel plans: a port's custom code declaring its own plan --------------------------------

_TP_PORT = """
from transformers import Qwen3Config, Qwen3ForCausalLM
{register}

class PortedConfig(Qwen3Config):
    model_type = "qwen3_tp_port"
    base_model_tp_plan = {{**Qwen3Config.base_model_tp_plan, **{plan!r}}}


class PortedForCausalLM(Qwen3ForCausalLM):
    config_class = PortedConfig
"""
# A row-parallel style whose partial sums stay partial: the all-reduce a hand-written style forgot.
_UNREDUCED_STYLE = """
from torch.distributed.tensor import Partial, Shard
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, RowwiseParallel

ALL_PARALLEL_STYLES.register("rowwise_unreduced", RowwiseParallel(input_layouts=Shard(-1), output_layouts=Partial()))
"""


def _custom_code_checkpoint(path: Any, out: Any, code: str, model_type: str) -> Any:
    """``path`` as a custom-code checkpoint: ``code`` in modeling_port.py, loaded through auto_map."""
    import json

    _copy_checkpoint(path, out)
    (out / "modeling_port.py").write_text(code)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_port.PortedConfig",
        "AutoModelForCausalLM": "modeling_port.PortedForCausalLM",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def tensor_parallel_port(qwen3_path: Any, out: Any, plan: dict[str, str], unreduced_style: bool = False) -> Any:
    """The tiny Qwen3 as a custom-code port whose config declares ``plan`` over Qwen3's tensor-parallel plan."""
    register = _UNREDUCED_STYLE if unreduced_style else ""
    return _custom_code_checkpoint(qwen3_path, out, _TP_PORT.format(register=register, plan=plan), "qwen3_tp_port")


def q_proj_sharded_along_its_input(qwen3_path: Any, out: Any) -> Any:
    """A port's plan shards q_proj row-wise (along its input) where its heads need it column-wise."""
    return tensor_parallel_port(qwen3_path, out, {"layers.*.self_attn.q_proj": "rowwise"})


def o_proj_never_reduced(qwen3_path: Any, out: Any) -> Any:
    """A port's own row-parallel style for o_proj that leaves each rank's partial sum un-reduced."""
    return tensor_parallel_port(qwen3_path, out, {"layers.*.self_attn.o_proj": "rowwise_unreduced"}, True)


# --- broken under accelerate's placement: custom code that only works with every weight on one device --------

_OFFLOAD_PORT = """
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model


class PortedConfig(Qwen3Config):
    model_type = "qwen3_offload_port"


class PortedModel(Qwen3Model):
    config_class = PortedConfig

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        if position_ids is None:  # positions made on "the model's device", read off a weight
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # named cache from transformers 5.24
            seen = cache.get_seq_length() if cache is not None else 0
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = torch.arange(seen, seen + length, device=self.norm.weight.device)[None]
        return super().forward(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)


class PortedForCausalLM(Qwen3ForCausalLM):
    config_class = PortedConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = PortedModel(config)
        self.post_init()
"""


def device_read_off_a_weight(qwen3_path: Any, out: Any) -> Any:
    """A port that makes its default position ids on ``self.norm.weight.device``: on one device that is the
    device, under disk offload it is the meta device (accelerate loads the weight only while norm runs)."""
    return _custom_code_checkpoint(qwen3_path, out, _OFFLOAD_PORT, "qwen3_offload_port")


# --- broken in training: the loss a port computes from labels=, and its training-mode forward ----------------


def _with_own_loss(path: Any, loss_of: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port that computes its loss itself from the logits it returns (``loss_of(logits, labels)``)."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)
    original = model.forward

    def forward(*args: Any, labels: Any = None, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if labels is not None:
            out.loss = loss_of(out.logits.float(), labels)
        return out

    model.forward = forward
    return model, tokenizer


def loss_without_shift(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port that scores position t against label t (it expected the data collator to shift the labels)."""
    return _with_own_loss(
        path, lambda logits, labels: F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), dtype
    )


def loss_counting_masked_tokens(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port that builds its labels from input_ids (``labels = input_ids.clone()``) and ignores the ones given,
    so the prompt tokens a fine-tuner masked with -100 are scored too."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)
    original = model.forward

    def forward(input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
        return original(input_ids=input_ids, labels=None if labels is None else input_ids.clone(), **kwargs)

    model.forward = forward
    return model, tokenizer


def loss_averaged_per_row(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port that averages each row's mean loss (right for one row, wrong for a batch of unequal rows)."""

    def loss_of(logits: Any, labels: Any) -> Any:
        rows = [
            F.cross_entropy(row[:-1], row_labels[1:], ignore_index=-100)
            for row, row_labels in zip(logits, labels, strict=True)
        ]
        return torch.stack(rows).mean()

    return _with_own_loss(path, loss_of, dtype)


def checkpointing_detaches_a_layer(path: Any, layer: int = 0, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port whose layer, under activation checkpointing, hands on its output detached (a custom checkpoint
    wrapper that breaks the graph): no gradient reaches the parameters before it."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)

    def detach_when_checkpointing(module: Any, args: Any, output: Any) -> Any:
        if module.training and module.gradient_checkpointing:
            return output.detach() if isinstance(output, torch.Tensor) else (output[0].detach(), *output[1:])
        return output

    model.model.layers[layer].register_forward_hook(detach_when_checkpointing)
    return model, tokenizer


def dropout_hard_coded(path: Any, p: float = 0.1, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port whose MLP applies dropout with a fixed rate in training mode, whatever the config says (0)."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)
    mlp = model.model.layers[0].mlp
    mlp.register_forward_hook(lambda module, args, output: F.dropout(output, p=p, training=module.training))
    return model, tokenizer


def sliding_window_crop_off_by_one(path: Any) -> tuple[Any, Any]:
    """A port whose sliding-window layers crop their cache off by one: once a sequence outgrows the window, the
    oldest kept key and value are dropped and the newest is kept twice (the window keeps its length, so no shape
    breaks). The full-attention layers are untouched."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model, tokenizer = load_healthy(path)

    def crop(module, args, kwargs, output):
        for layer in getattr(cache_in(dict(output)), "layers", []):
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.cumulative_length >= layer.sliding_window:
                layer.keys = torch.cat([layer.keys[:, :, 1:], layer.keys[:, :, -1:]], dim=2)
                layer.values = torch.cat([layer.values[:, :, 1:], layer.values[:, :, -1:]], dim=2)
        return output

    model.register_forward_hook(crop, with_kwargs=True)
    return model, tokenizer


def reorder_keys_only(path: Any, dtype: Any = torch.float32) -> tuple[Any, Any]:
    """A port's own ``_reorder_cache`` (the legacy hook generate still prefers) that moves the keys with the
    beams and forgets the values: every beam attends with another beam's values once beams overtake."""
    model, tokenizer = load_healthy(path)

    def reorder(cache: Any, beam_idx: torch.Tensor) -> Any:
        for layer in cache.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(0, beam_idx.to(layer.keys.device))
        return cache

    model._reorder_cache = reorder
    return model.to(dtype), tokenizer


# --- sampling: what a port's own generation code or a copied generation_config does to the drawn tokens ------

_SAMPLING_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")


def _with_processor_list(model: Any, edit) -> None:
    """Wrap the model's ``_get_logits_processor`` as a port's override does: ``edit(processors, config)``."""
    from transformers import LogitsProcessorList

    _require_internal(model, "_get_logits_processor", "generation_config")
    original = model._get_logits_processor

    def processors(generation_config, *args, **kwargs):
        return LogitsProcessorList(edit(list(original(generation_config, *args, **kwargs)), generation_config))

    model._get_logits_processor = processors


def warpers_left_out(path: Any) -> tuple[Any, Any]:
    """A port whose ``_get_logits_processor`` override predates transformers 4.42, which merged the sampling
    warpers into that list: it rebuilds the processors only, so temperature, top_k, top_p and min_p never apply."""
    model, tokenizer = load_healthy(path)
    _with_processor_list(model, lambda found, config: [p for p in found if type(p).__name__ not in _SAMPLING_WARPERS])
    return model, tokenizer


def temperature_applied_twice(path: Any) -> tuple[Any, Any]:
    """A port whose own processor list adds the temperature, written when transformers left it to the caller:
    transformers applies it as well, so the distribution is sharpened twice."""
    from transformers import TemperatureLogitsWarper

    model, tokenizer = load_healthy(path)
    _with_processor_list(model, lambda found, config: [*found, TemperatureLogitsWarper(config.temperature)])
    return model, tokenizer


def summarisation_generation_config(path: Any, out: Any) -> Any:
    """generation_config.json written from a summarisation model's template: no_repeat_ngram_size 3 comes with
    the sampling settings, so the model can never repeat three tokens (code, lists, names) while sampling."""
    _copy_checkpoint(path, out)
    _edit_generation_config(out, do_sample=True, temperature=0.8, top_p=0.95, no_repeat_ngram_size=3)
    return out


def router_jitter_from_numpy(path: Any, scale: float = 0.5) -> tuple[Any, Any]:
    """A port from JAX whose MLP adds router-style jitter drawn from numpy's global generator, left on in eval:
    torch.manual_seed does not seed it, so a seeded run cannot be repeated."""
    import numpy as np

    model, tokenizer = load_healthy(path)

    def jitter(module, args, output):
        noise = np.random.standard_normal(tuple(output.shape)).astype("float32")
        return output + scale * torch.from_numpy(noise).to(output.device, output.dtype)

    for layer in model.model.layers:
        layer.mlp.register_forward_hook(jitter)
    return model, tokenizer


# --- packed sequences and 4D masks: how a port's forward or kernel loses the boundaries between sequences ------


def rotary_positions_counted_by_the_port(path: Any) -> tuple[Any, Any]:
    """A port whose rotary embedding counts positions itself (0..n-1 along the row, as code written for
    generation without padding does) instead of reading position_ids: a packed sequence after the first sits at
    its offset in the row instead of at 0."""
    model, tokenizer = load_healthy(path)
    rotary = model.model.rotary_emb
    original = rotary.forward

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        counted = torch.arange(position_ids.shape[-1], device=position_ids.device) + position_ids[..., :1]
        return original(x, counted.expand_as(position_ids), *args, **kwargs)

    rotary.forward = forward
    return model, tokenizer


def default_attention_mask_filled_in(path: Any) -> tuple[Any, Any]:
    """A port's forward that fills in an all-ones ``attention_mask`` over the cache and the input when none is
    given, as LLaMA's modeling code did before transformers 4.36: transformers then never sees the mask-less
    call in which it detects packed position_ids."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is None and input_ids is not None:
            cache = cache_in(kwargs)
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones((input_ids.shape[0], past + input_ids.shape[1]), dtype=torch.long)
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.forward = forward
    return model, tokenizer


def every_mask_made_additive(path: Any) -> tuple[Any, Any]:
    """A port that turns every mask it is given from 1/0 into additive form, a 4D mask included, which already
    is additive: the positions a custom 4D mask allows (0) become blocked and the blocked ones open."""
    model, tokenizer = load_healthy(path)
    original = model.forward

    def forward(input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = (1.0 - attention_mask) * torch.finfo(attention_mask.dtype).min
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.forward = forward
    return model, tokenizer


def rotary_angles_in_the_run_dtype(path: Any, dtype: Any = torch.bfloat16) -> tuple[Any, Any]:
    """A port that computes its rotary angles (position x inverse frequency) in the model's dtype, as Llama ports
    did before transformers forced float32 there: exact for short prompts, off by up to a radian past position
    256 in bfloat16, where the dtype stops holding integers exactly."""
    model, tokenizer = load_healthy(path)
    model.to(dtype)
    rotary = model.model.rotary_emb

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        freqs = position_ids[..., None].to(x.dtype) * rotary.inv_freq.to(x.device, x.dtype)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * rotary.attention_scaling).to(x.dtype), (angles.sin() * rotary.attention_scaling).to(
            x.dtype
        )

    rotary.forward = forward
    return model, tokenizer
