"""pytest-causal-lm: invariants every correct causal language model satisfies.

Public API: the ``assert_*`` helpers, the ``CausalLM`` handle the ``causal_lm``
fixture yields, and the tolerance table. Importing this package does not
import torch or transformers; the helpers import them when called.
"""

from .checks import (
    ChatTemplateWarning,
    CheckResult,
    GenerationConfigWarning,
    NearTieWarning,
    assert_batch_independent,
    assert_cache_effective,
    assert_chat_template_consistent,
    assert_classification_head_equivalent,
    assert_deterministic,
    assert_finite_logits,
    assert_greedy_parity,
    assert_kv_cache_parity,
    assert_logits_to_keep,
    assert_output_shapes,
    assert_padding_invariant,
    assert_prefix_causal,
    assert_special_tokens_agree,
    assert_vocab_alignment,
    greedy_loop,
    load_score_head_classifier,
)
from .loading import CausalLM, CheckpointLoadError, Target
from .tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TOLERANCES",
    "CausalLM",
    "ChatTemplateWarning",
    "CheckResult",
    "CheckpointLoadError",
    "GenerationConfigWarning",
    "NearTieWarning",
    "Target",
    "Tolerance",
    "assert_batch_independent",
    "assert_cache_effective",
    "assert_chat_template_consistent",
    "assert_classification_head_equivalent",
    "assert_deterministic",
    "assert_finite_logits",
    "assert_greedy_parity",
    "assert_kv_cache_parity",
    "assert_logits_to_keep",
    "assert_output_shapes",
    "assert_padding_invariant",
    "assert_prefix_causal",
    "assert_special_tokens_agree",
    "assert_vocab_alignment",
    "greedy_loop",
    "load_score_head_classifier",
    "tolerance_for",
]
