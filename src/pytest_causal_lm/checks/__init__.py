"""Families of invariants; each helper raises AssertionError with a full message."""

from .causality import assert_prefix_causal
from .determinism import assert_deterministic
from .shapes import assert_finite_logits, assert_logits_to_keep, assert_output_shapes
from .vocab import assert_special_tokens_agree, assert_vocab_alignment

__all__ = [
    "assert_deterministic",
    "assert_finite_logits",
    "assert_logits_to_keep",
    "assert_output_shapes",
    "assert_prefix_causal",
    "assert_special_tokens_agree",
    "assert_vocab_alignment",
]
