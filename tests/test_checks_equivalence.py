"""The equivalent-paths engine: drawn combinations of batch size, lengths, left padding and cache chunks, each row
against the row alone, a failure shrunk to the smallest case. Judged by what it catches that no named invariant
does, by the cases it reports, and by writing nothing."""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import broken
import pytest
import torch
from conftest import failure_of, in_dtype

import pytest_causal_lm as clm
from pytest_causal_lm.tiny import materialize

# The named invariants that compare batches, padding and cached paths: a serving kernel that drops the padding
# mask only for cached steps of batches over 8 rows passes every one of them.
NAMED = (
    clm.assert_padding_invariant,
    clm.assert_batch_independent,
    clm.assert_kv_cache_parity,
    clm.assert_static_cache_matches,
    clm.assert_greedy_parity,
    clm.assert_continuation_matches,
    clm.assert_assisted_decoding_matches,
    clm.assert_beam_search_consistent,
    clm.assert_sampling_consistent,
    clm.assert_packed_sequences_consistent,
    clm.assert_long_prefill_consistent,
    clm.assert_attention_implementations_agree,
    clm.assert_prefix_causal,
)
SMALLEST_BATCHED_DECODE = (
    "equivalent paths: row 0 of the smallest failing case (9 rows of 1, 1, 1, 1, 1, 1, 1, 1, 2 tokens, left-padded "
    "to 2, fed through the cache in chunks starting at [0, 1]) scores unlike the row alone from position 0"
)


def _drawn(model, tokenizer, *, tolerance: clm.Tolerance) -> clm.CheckResult:
    return clm.assert_equivalent_paths_agree(model, tokenizer, tolerance=tolerance)  # 100 draws


def test_healthy_tiny_checkpoints_agree_over_drawn_cases(
    healthy: clm.CausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = clm.assert_equivalent_paths_agree(healthy.model, healthy.tokenizer)
    assert 0 < result.greatest_difference < 1e-4, str(result)
    found = re.search(
        r"(\d+) drawn cases agree: up to 16 rows of up to 512 tokens; padded batch, right-padded batch, padded "
        r"batch through the cache, packed row \(up to 512 tokens\); under sdpa, eager attention",
        str(result),
    )
    assert found and int(found[1]) >= 100, str(result)
    assert list(tmp_path.iterdir()) == []  # hypothesis's caches went to a temporary directory


def test_a_serving_kernel_only_the_engine_catches(llama_path: Path) -> None:
    model, tokenizer = broken.batched_decode_drops_padding(llama_path)
    for check in NAMED:
        check(model, tokenizer)  # passes: none of them cached steps of a padded batch over 8 rows
    message = failure_of(_drawn, (model, tokenizer), torch.float32)
    assert message.startswith(SMALLEST_BATCHED_DECODE), message
    assert re.search(r"first departing module\s+: model.layers.0.self_attn \(LlamaAttention\)", message)
    assert re.search(r"drawn\s+: \d+ cases, shrunk to this one \(hypothesis, seeded, no database\)", message)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_serving_kernel_fails_in_half_precision_too(llama_path: Path, dtype: torch.dtype) -> None:
    def drawn_short(model, tokenizer, *, tolerance: clm.Tolerance) -> clm.CheckResult:
        # its bug is in rows of 1-2 tokens: 128-token rows keep CPU float16 fast (the long-row default is proven
        # in half precision by the long-key sdpa bug below)
        return clm.assert_equivalent_paths_agree(model, tokenizer, tolerance=tolerance, max_tokens=128)

    message = failure_of(drawn_short, broken.batched_decode_drops_padding(llama_path), dtype)
    assert message.startswith(SMALLEST_BATCHED_DECODE), message


@pytest.mark.parametrize(
    ("name", "smallest"),
    [
        # every batch over 8 rows, no cache needed
        ("large_batch_drops_padding", "9 rows of 1, 1, 1, 1, 1, 1, 1, 1, 2 tokens, left-padded to 2, one forward"),
        (
            "decode_ignores_padding",
            "2 rows of 1, 2 tokens, left-padded to 2, fed through the cache in chunks starting at [0, 1]",
        ),
        (
            "positions_restart_with_cache",
            "1 row of 2 tokens, no padding, fed through the cache in chunks starting at [0, 1]",
        ),
    ],
)
def test_other_bugs_shrink_to_their_smallest_case(llama_path: Path, name: str, smallest: str) -> None:
    message = failure_of(_drawn, getattr(broken, name)(llama_path), torch.float32)
    assert f"smallest failing case ({smallest})" in message, message
    if name == "decode_ignores_padding":  # the quickest to find: seeded, the same draws give the same message
        assert failure_of(_drawn, getattr(broken, name)(llama_path), torch.float32) == message


def _only_the_engine_fails(model, tokenizer) -> str:
    for check in NAMED:
        check(model, tokenizer)
    with pytest.raises(AssertionError) as caught:
        clm.assert_equivalent_paths_agree(model, tokenizer)
    return str(caught.value)


def test_a_port_that_assumes_left_padding_fails_on_right_padding_only(llama_path: Path) -> None:
    # scoring a batch as tokenizer(texts, padding=True) pads it: on the right, with no position_ids
    message = _only_the_engine_fails(*broken.positions_filled_in_for_left_padding(llama_path))
    assert message.startswith(
        "equivalent paths: row 0 of the smallest failing case (2 rows of 2, 3 tokens, right-padded to 3, one "
        "forward with an attention_mask and no position_ids (as model(**tokenizer(texts, padding=True)) calls "
        "it)) scores unlike the row alone from position 1"
    ), message
    assert re.search(r"padding\s+: 1 pad tokens on the right", message), message


def test_an_sdpa_path_for_long_rows_is_drawn_under_another_loaded_implementation(
    llama_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the checkpoint loaded in eager; sdpa (another implementation users switch to) drops the padding past 256 keys:
    # the attention invariant's short prompts, the long prefill's one row, every padded check pass
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", broken.long_keys_sdpa_drops_padding)
    message = _only_the_engine_fails(*broken.load_healthy(llama_path, attn_implementation="eager"))
    assert message.startswith(
        "equivalent paths: row 0 of the smallest failing case (2 rows of 1, 257 tokens, left-padded to 257, one "
        "forward, under sdpa attention) scores unlike the row alone from position 0"
    ), message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_kernel_reading_packed_rows_as_padding_shrinks_to_a_packed_case(llama_path: Path, dtype) -> None:
    message = failure_of(_drawn, broken.packed_rows_read_as_padding(llama_path, dtype), dtype)
    assert (
        "smallest failing case (2 rows of 1, 1 tokens, packed in one row, position_ids restarting at 0 per row, "
        "no attention_mask, no cache)" in message
    ), message
    # the first sequence fails: the kernel reads the padding from the last query, which sees the last sequence only
    assert re.search(r"row 0 of the smallest failing case .* from position 0", message), message
    assert re.search(r"offset\s+: 0 tokens before it in the packed row", message), message


def test_rows_are_long_where_forwards_are_cheap_in_every_dtype(llama_path: Path) -> None:
    model, _ = broken.load_healthy(llama_path)
    assert clm.checks.equivalence.default_row_tokens(model) == 512
    assert clm.checks.equivalence.default_row_tokens(model.to(torch.bfloat16)) == 512


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_rows_in_half_precision_are_judged_against_a_long_rows_noise_floor(
    llama_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half precision's calibrated tolerance comes from short prompts; rows past 128 tokens round further."""
    import pytest_causal_lm.precision

    model, tokenizer, tolerance = in_dtype(dtype, broken.load_healthy(llama_path))
    result = clm.assert_equivalent_paths_agree(model, tokenizer, tolerance=tolerance, examples=20)
    said = str(result)
    assert re.search(
        r"past 128 tokens: atol [0-9.e-]+, 2x the noise floor [0-9.e-]+ \(\w+16 vs float32.* on one 512-token row", said
    ), said
    assert result.tolerance.atol >= tolerance.atol and "of up to 512 tokens" in said
    # where no floor can be measured (no room for float32 weights, a nondeterministic model), rows stay short
    monkeypatch.setattr(pytest_causal_lm.precision, "measure_noise_floor", lambda *args, **kwargs: None)
    said = str(clm.assert_equivalent_paths_agree(model, tokenizer, tolerance=tolerance, examples=5))
    assert "rows of up to 128 tokens: no noise floor of a 512-token row could be measured" in said, said
    assert "of up to 128 tokens" in said


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        # transformers' RWKV answers a batch of one-token rows (what every cached decoding step of a batch feeds)
        # with scores of shape (batch, batch, vocab)
        (
            "rwkv",
            "equivalent paths: 2 rows of 1, 1 tokens, no padding, one forward gave scores of shape (2, 2, 384) "
            "for 2 rows of 1 tokens",
        ),
        # the engine passes position_ids as generate does, counted from 0 (the known RoBERTa discrepancy)
        ("roberta", "likely cause           : the forward's default positions are not the ones generate passes"),
        # a decoder whose forward takes no position_ids (the known BART-family padding discrepancy)
        ("bart", "likely cause           : the forward takes no position_ids: left padding moves the row's tokens on"),
    ],
)
def test_failures_on_transformers_architectures_name_their_cause(model_type: str, expected: str) -> None:
    model, tokenizer = broken.load_healthy(materialize(f"tiny:{model_type}"))
    with pytest.raises(AssertionError) as caught:
        clm.assert_equivalent_paths_agree(model, tokenizer, examples=20)
    assert expected in str(caught.value), str(caught.value)


def test_the_engine_is_opt_in(pytester: pytest.Pytester, qwen3_path: Path, llama_path: Path) -> None:
    model, tokenizer = broken.load_healthy(llama_path)
    with pytest.raises(pytest.skip.Exception, match=r"no cases to draw \(examples=0; --causal-lm-equivalence-examples"):
        clm.assert_equivalent_paths_agree(model, tokenizer, examples=0)
    assert re.search(
        r"\d{3} drawn cases agree", str(clm.assert_equivalent_paths_agree(model, tokenizer))
    )  # 100 by default
    checkpoint = f"--causal-lm-checkpoint={qwen3_path}"
    off = pytester.runpytest(checkpoint, "--causal-lm-suite=only", "-k", "equivalent_paths", "-rs")
    off.assert_outcomes(skipped=1)
    off.stdout.fnmatch_lines(["*equivalent paths are opt-in: pass --causal-lm-equivalence-examples=N*"])
    report = pytester.path / "report.md"
    on = pytester.runpytest(
        checkpoint,
        "--causal-lm-suite=only",
        "-k",
        "equivalent_paths",
        "--causal-lm-equivalence-examples=10",
        f"--causal-lm-report={report}",
    )
    on.assert_outcomes(passed=1)
    assert "drawn cases agree" in report.read_text()
    assert not (pytester.path / ".hypothesis").exists()


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Finds no ``hypothesis``: what a plain ``pip install pytest-causal-lm`` leaves."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ModuleNotFoundError(f"No module named {name!r}")


def test_without_hypothesis_the_engine_says_what_to_install(
    pytester: pytest.Pytester, qwen3_path: Path, llama_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = broken.load_healthy(llama_path)
    monkeypatch.delitem(sys.modules, "hypothesis", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"pip install 'pytest-causal-lm\[equivalence\]'"):
        clm.assert_equivalent_paths_agree(model, tokenizer, examples=5)
    # the suite's run stops before loading anything, with one line. Plugins are not autoloaded: pytest would mark
    # hypothesis's files for assertion rewriting, and its import hook would find the package after all
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_inprocess(
        "-p", "pytest_causal_lm.plugin", f"--causal-lm-checkpoint={qwen3_path}", "--causal-lm-equivalence-examples=5"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: --causal-lm-equivalence-examples: equivalent paths draw their cases with hypothesis, which is "
            "not installed: pip install 'pytest-causal-lm[equivalence]'"
        ]
    )
    assert "loading" not in result.stdout.str()


def test_hypothesis_is_an_extra_not_a_dependency() -> None:
    # hypothesis's pytest plugin imports all of hypothesis (about 0.9 s) at the end of every pytest run of every
    # project where it is installed: a dependency would cost that to projects that never draw a case
    requirements = importlib.metadata.requires("pytest-causal-lm") or []
    drawn = [r for r in requirements if r.startswith("hypothesis")]
    assert drawn and all('extra == "equivalence"' in r or 'extra == "dev"' in r for r in drawn), drawn


def test_a_packed_row_stays_within_the_length_the_model_promises(gpt_neo_path: Path) -> None:
    # restarting position_ids does not lift the context: GPT-Neo's causal-mask buffer has max_position_embeddings
    # rows, and a longer packed row raised "The size of tensor a (512) must match" before the budget was capped
    from hypothesis import Phase, find, settings
    from hypothesis.errors import NoSuchExample

    from pytest_causal_lm.checks import equivalence

    model, tokenizer = broken.load_healthy(gpt_neo_path)
    result = clm.assert_equivalent_paths_agree(model, tokenizer, examples=10, max_tokens=200)
    assert "packed row (up to 512 tokens)" in str(result), str(result)
    engine = SimpleNamespace(paths=[equivalence.PACKED], implementations=[""], pack_budget=512)
    cases = equivalence._cases(800, 16, 200, engine)
    fast = settings(max_examples=300, database=None, phases=[Phase.generate])  # no shrinking: only existence

    def total(case: equivalence.Case) -> int:
        return sum(n for _, n in case.rows)

    with pytest.raises(NoSuchExample):
        find(cases, lambda case: total(case) > 512, settings=fast)
    assert total(find(cases, lambda case: total(case) > 400, settings=fast)) <= 512  # the cap binds, not a row
    assert len(find(cases, lambda case: len(case.rows) == 16, settings=fast).rows) == 16  # every row packed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_right_padding_and_long_sdpa_bugs_fail_in_half_precision_too(
    llama_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    message = failure_of(_drawn, broken.positions_filled_in_for_left_padding(llama_path), dtype)
    assert "smallest failing case (2 rows of 2, 3 tokens, right-padded to 3, one forward" in message, message
    # by default: rows past 128 tokens in half precision are judged against a long row's noise floor
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", broken.long_keys_sdpa_drops_padding)
    model, tokenizer, tolerance = in_dtype(dtype, broken.load_healthy(llama_path, attn_implementation="eager"))
    with pytest.raises(AssertionError) as caught:
        clm.assert_equivalent_paths_agree(model, tokenizer, tolerance=tolerance)
    assert "(2 rows of 1, 257 tokens, left-padded to 257, one forward, under sdpa attention)" in str(caught.value)
