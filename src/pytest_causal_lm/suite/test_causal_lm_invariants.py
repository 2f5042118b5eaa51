"""The built-in invariant suite, collected when a checkpoint is configured.

Each test calls one public helper and records what it measured as the
``causal_lm`` user property (a dict; it feeds the verdict table and --junitxml). Select families with
-m (causal_lm_shapes, causal_lm_cache, ...) or single tests with -k.
"""

from collections.abc import Callable

import pytest

import pytest_causal_lm as clm
from pytest_causal_lm.plugin import snapshot_root, snapshots_enabled
from pytest_causal_lm.snapshot import behaviour_record

pytestmark = pytest.mark.causal_lm

Record = Callable[[str, object], None]


def _record(record_property: Record, result: clm.CheckResult | None) -> None:
    if result is not None:
        record_property("causal_lm", result.as_dict())


@pytest.mark.causal_lm_shapes
def test_output_shapes(causal_lm: clm.CausalLM) -> None:
    clm.assert_output_shapes(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_shapes
def test_logits_to_keep(causal_lm: clm.CausalLM, record_property: Record) -> None:
    _record(
        record_property, clm.assert_logits_to_keep(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)
    )


@pytest.mark.causal_lm_vocab
def test_vocab_alignment(causal_lm: clm.CausalLM) -> None:
    clm.assert_vocab_alignment(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_vocab
def test_special_token_ids(causal_lm: clm.CausalLM) -> None:
    clm.assert_special_tokens_agree(causal_lm.model, causal_lm.tokenizer)


@pytest.mark.causal_lm_causality
def test_prefix_causality(causal_lm: clm.CausalLM, record_property: Record) -> None:
    result = clm.assert_prefix_causal(
        causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance, seed=causal_lm.seed
    )
    _record(record_property, result)


@pytest.mark.causal_lm_determinism
def test_determinism(causal_lm: clm.CausalLM, record_property: Record) -> None:
    _record(
        record_property, clm.assert_deterministic(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)
    )


@pytest.mark.causal_lm_cache
def test_kv_cache_parity(causal_lm: clm.CausalLM, record_property: Record) -> None:
    result = clm.assert_kv_cache_parity(
        causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance, seed=causal_lm.seed
    )
    _record(record_property, result)


@pytest.mark.causal_lm_cache
def test_cache_effectiveness(causal_lm: clm.CausalLM, record_property: Record) -> None:
    _record(record_property, clm.assert_cache_effective(causal_lm.model, causal_lm.tokenizer))


@pytest.mark.causal_lm_generation
def test_greedy_loop_parity(causal_lm: clm.CausalLM, record_property: Record) -> None:
    _record(
        record_property, clm.assert_greedy_parity(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)
    )


@pytest.mark.causal_lm_classification
def test_classification_head(causal_lm: clm.CausalLM, record_property: Record) -> None:
    source, kwargs = causal_lm.pretrained_location()
    result = clm.assert_classification_head_equivalent(
        causal_lm.model, causal_lm.tokenizer, source=source, tolerance=causal_lm.tolerance, **kwargs
    )
    _record(record_property, result)


@pytest.mark.causal_lm_padding
def test_padding_invariance(causal_lm: clm.CausalLM, record_property: Record) -> None:
    result = clm.assert_padding_invariant(causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance)
    _record(record_property, result)


@pytest.mark.causal_lm_padding
def test_batch_independence(causal_lm: clm.CausalLM, record_property: Record) -> None:
    result = clm.assert_batch_independent(
        causal_lm.model, causal_lm.tokenizer, tolerance=causal_lm.tolerance, seed=causal_lm.seed
    )
    _record(record_property, result)


@pytest.mark.causal_lm_chat
def test_chat_template(causal_lm: clm.CausalLM, record_property: Record) -> None:
    _record(record_property, clm.assert_chat_template_consistent(causal_lm.model, causal_lm.tokenizer))


@pytest.mark.causal_lm_snapshot
def test_behaviour_snapshot(causal_lm: clm.CausalLM, request: pytest.FixtureRequest) -> None:
    if not snapshots_enabled(request.config):
        pytest.skip(
            "behaviour snapshots are opt-in: pass --snapshot-update once (writes them under "
            f"{snapshot_root(request.config)}), or set --causal-lm-snapshot-dir / causal_lm_snapshot_dir"
        )
    snapshot = request.getfixturevalue("causal_lm_snapshot")
    assert snapshot == behaviour_record(causal_lm.model, causal_lm.tokenizer, name=causal_lm.target.id)
