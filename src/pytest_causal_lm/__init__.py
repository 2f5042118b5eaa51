"""pytest-causal-lm: invariants every correct causal language model satisfies.

Public API: the ``assert_*`` helpers, the ``CausalLM`` handle the ``causal_lm``
fixture yields, and the tolerance table. Importing this package does not
import torch or transformers; the helpers import them when called.
"""

from .checks import (
    assert_deterministic,
    assert_finite_logits,
    assert_logits_to_keep,
    assert_output_shapes,
    assert_prefix_causal,
    assert_special_tokens_agree,
    assert_vocab_alignment,
)
from .loading import CausalLM, CheckpointLoadError, Target
from .tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TOLERANCES",
    "CausalLM",
    "CheckpointLoadError",
    "Target",
    "Tolerance",
    "assert_deterministic",
    "assert_finite_logits",
    "assert_logits_to_keep",
    "assert_output_shapes",
    "assert_prefix_causal",
    "assert_special_tokens_agree",
    "assert_vocab_alignment",
    "tolerance_for",
]
