"""Drift from a reference checkpoint (opt-in: --causal-lm-reference=CKPT)."""

from collections.abc import Callable

import pytest

import pytest_causal_lm as clm
from pytest_causal_lm.checks.reference import ReferenceOutputs, assert_close_to_reference
from pytest_causal_lm.plugin import SETTINGS_KEY


@pytest.mark.causal_lm_reference
def test_reference_drift(
    causal_lm_reference: ReferenceOutputs,  # first: the reference is computed and freed before the candidate loads
    causal_lm: clm.CausalLM,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    settings = request.config.stash[SETTINGS_KEY]
    thresholds = {
        "kl_mean": settings.reference_max_kl_mean,
        "kl_p99": settings.reference_max_kl_p99,
        "top1_agreement": settings.reference_min_top1,
        "perplexity_delta": settings.reference_max_perplexity_delta,
    }
    report = assert_close_to_reference(
        causal_lm.model, causal_lm.tokenizer, causal_lm_reference, thresholds=thresholds, tolerance=causal_lm.tolerance
    )
    record_property(
        "causal_lm",
        {
            "invariant": "reference drift",
            "greatest_difference": None,
            "notes": [str(report)],
            "drift": report.as_dict(),
        },
    )
