"""The first departing module: every parity failure names where the two computations part."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import broken
import pytest
import torch
from conftest import in_dtype as _in

import pytest_causal_lm as clm
from pytest_causal_lm.checks import _localise
from pytest_causal_lm.checks._localise import Replay, Side, Trace, localisation_rows, locate, within
from pytest_causal_lm.tiny import materialize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _message(check: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(AssertionError) as caught:
        check(*args, **kwargs)
    return str(caught.value)


def _departing(message: str) -> str:
    """The module the failure names first, and the lines before it (it must come early, before long tables)."""
    lines = message.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("first departing module"))
    assert at <= 8, message
    return lines[at].split(":", 1)[1].strip()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_cache_bug_in_one_layer_is_located_in_that_layers_attention(qwen3_path: Path, dtype) -> None:
    model, tokenizer, tolerance = _in(dtype, broken.cache_drops_newest_key(qwen3_path, layer=1))
    message = _message(clm.assert_kv_cache_parity, model, tokenizer, tolerance=tolerance)
    assert message.startswith("KV-cache parity violated: decoding step")
    assert _departing(message).startswith("model.layers.1.self_attn (Qwen3Attention): output at position")
    assert "its input agrees" in _departing(message)
    assert re.search(r"decoder layers\s+: model.layers.0 Δ \S+ agrees; model.layers.1 Δ \S+ departs", message)


def _full_then_sliding(gemma2: Path, out: Path) -> Path:
    """The tiny Gemma 2 with its layer kinds swapped: full attention first, the sliding window in layer 1."""
    broken._copy_checkpoint(gemma2, out)
    broken._edit_config(out, layer_types=["full_attention", "sliding_attention"])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_cache_bug_only_in_sliding_window_layers_is_located_in_the_sliding_layer(tmp_path: Path, dtype) -> None:
    path = _full_then_sliding(materialize("tiny:gemma2"), tmp_path / "gemma2")
    model, tokenizer, tolerance = _in(dtype, broken.sliding_window_crop_off_by_one(path))
    assert model.config.layer_types[1] == "sliding_attention"
    message = _message(clm.assert_long_context_consistent, model, tokenizer, tolerance=tolerance)
    assert message.startswith("long context: cached pass")
    assert _departing(message).startswith("model.layers.1.self_attn (Gemma2Attention)")
    assert re.search(r"decoder layers\s+: model.layers.0 Δ \S+ agrees; model.layers.1 Δ \S+ departs", message)


def test_the_healthy_sliding_window_layout_passes(tmp_path: Path) -> None:
    model, tokenizer = broken.load_healthy(_full_then_sliding(materialize("tiny:gemma2"), tmp_path / "gemma2"))
    clm.assert_long_context_consistent(model, tokenizer)


def test_padding_that_reaches_attention_is_located_in_the_first_attention(qwen3_path: Path) -> None:
    model, tokenizer = broken.padding_mask_ignored(qwen3_path)
    message = _message(clm.assert_padding_invariant, model, tokenizer)
    assert _departing(message).startswith("model.layers.0.self_attn (Qwen3Attention): output at position 5")
    assert "the prompt alone" in _departing(message) and "row 0 of the padded batch" in _departing(message)


def test_rows_coupled_after_a_layer_are_located_at_that_layer(qwen3_path: Path) -> None:
    model, tokenizer = broken.rows_coupled(qwen3_path)
    message = _message(clm.assert_batch_independent, model, tokenizer)
    assert _departing(message).startswith("model.layers.0 (Qwen3DecoderLayer)")
    assert re.search(r"modules around it\s+: .*model.layers.0.mlp Δ 0;", message)


def test_a_leaky_mask_is_located_in_attention_with_its_input_agreeing(qwen3_path: Path) -> None:
    model, tokenizer = broken.leaky_mask(qwen3_path)
    message = _message(clm.assert_prefix_causal, model, tokenizer)
    assert re.match(r"model.layers.\d.self_attn \(Qwen3Attention\)", _departing(message))


def test_positions_restarted_in_a_cached_step_are_located_in_the_rotary_embedding(qwen3_path: Path) -> None:
    model, tokenizer = broken.positions_restart_with_cache(qwen3_path)
    message = _message(clm.assert_kv_cache_parity, model, tokenizer)
    assert _departing(message).startswith("model.rotary_emb (Qwen3RotaryEmbedding)")


def test_a_passing_check_never_replays(healthy: clm.CausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a green check replayed its sides")

    monkeypatch.setattr(_localise, "record", refuse)
    for check in (clm.assert_kv_cache_parity, clm.assert_padding_invariant, clm.assert_prefix_causal):
        check(healthy.model, healthy.tokenizer)


def test_a_replay_that_raises_is_one_row_and_never_hides_the_failure(healthy: clm.CausalLM) -> None:
    def broken_replay() -> None:
        raise RuntimeError("shapes do not match")

    replay = Replay(Side("a", lambda: healthy.model(input_ids=torch.tensor([[1, 2]]))), Side("b", broken_replay), (1,))
    rows = localisation_rows(healthy.model, replay, within(clm.tolerance_for("float32")))
    assert rows == [
        ("first departing module", "not located: replaying the two sides raised RuntimeError: shapes do not match")
    ]


def _trace(**modules: tuple[list[float], list[float] | None]) -> Trace:
    plain = {
        name: ("Linear", torch.tensor([output]), None if given is None else torch.tensor([given]))
        for name, (output, given) in modules.items()
    }
    return Trace.from_plain(plain)


def test_a_module_whose_input_already_departs_is_not_where_the_sides_part() -> None:
    expected = _trace(embed=([1.0, 2.0], None), attn=([3.0, 4.0], [1.0, 2.0]), proj=([5.0, 6.0], [3.0, 4.0]))
    actual = _trace(embed=([1.0, 2.0], None), attn=([3.0, 4.5], [1.0, 2.0]), proj=([5.0, 9.0], [3.0, 4.5]))
    found = locate(expected, actual, [7], within(clm.tolerance_for("float32")))
    assert (found.name, found.position, found.index, found.difference) == ("attn", 7, 1, 0.5)
    assert [(n, off) for n, _, off in found.neighbours] == [("embed", False), ("attn", True), ("proj", True)]


def test_when_no_module_departs_the_message_says_the_forward_itself_parts() -> None:
    same = _trace(embed=([1.0], None), head=([2.0], [1.0]))
    rows = _localise.departure_rows(same, same, ("a", "b"), [0], within(clm.tolerance_for("float32")))
    assert "the scores part outside the modules (the model's own forward" in rows[0][1]


def test_a_generate_step_is_replayed_and_located(llama_path: Path) -> None:
    model, tokenizer = broken.cache_stored_in_half_precision(llama_path)
    message = _message(clm.assert_static_cache_matches, model, tokenizer)
    assert message.startswith("static cache differs (first call): step 1 of row 0")
    assert _departing(message).startswith("model.layers.0.self_attn (LlamaAttention): output at position")
    assert "generate's step 1" in _departing(message)


def test_a_replay_fed_other_positions_says_so_instead_of_naming_a_module(llama_path: Path) -> None:
    # the port's reused static cache makes generate feed only part of the prompt on the next call
    model, tokenizer = broken.static_cache_reused_without_reset(llama_path)
    message = _message(clm.assert_static_cache_matches, model, tokenizer)
    assert re.search(
        r"first departing module\s+: not located: (no module output of generate's step 0 covers|replaying)", message
    )


def test_device_map_parity_replays_each_placement_on_its_own_model(qwen3_path: Path) -> None:
    # the second load stands in for an offloaded copy whose one norm came out wrong
    from pytest_causal_lm.checks._probes import parity_probes
    from pytest_causal_lm.checks.distributed import _compare_placements

    model, tokenizer = broken.load_healthy(qwen3_path)
    other, _ = broken.norm_weight_shifted_in_one_layer(qwen3_path, layer=1)
    probes = (parity_probes(model, tokenizer), parity_probes(other, tokenizer))
    tolerance = clm.tolerance_for("float32")
    message = _message(_compare_placements, model, other, tokenizer, probes, tolerance, "one device vs disk")
    assert message.startswith("device_map: the scores of a prompt differ between placements")
    assert _departing(message).startswith("model.layers.1.post_attention_layernorm (Qwen3RMSNorm)")
    assert "the session's model" in _departing(message) and "the second load" in _departing(message)
