"""pytest-causal-lm: invariants every correct causal language model satisfies.

The public API is ``__all__``: the ``assert_*`` helpers, the ``CausalLM`` handle
the ``causal_lm`` fixture yields, the invariant registry, the session state and
the tolerance table. Importing this package does not import torch or
transformers; the helpers import them when called.
"""

from .benchmark import benchmark_generation, forced_generate
from .checks import (
    CheckResult,
    GenerationConfigWarning,
    NearTieWarning,
    assert_assisted_decoding_matches,
    assert_attention_implementations_agree,
    assert_batch_independent,
    assert_cache_effective,
    assert_chat_markers_are_tokens,
    assert_chat_template_consistent,
    assert_classification_head_equivalent,
    assert_close_to_reference,
    assert_continuation_matches,
    assert_deterministic,
    assert_dtype_parity,
    assert_finite_logits,
    assert_generation_matches_forward,
    assert_generation_prompt_opens_the_answer,
    assert_greedy_parity,
    assert_inputs_embeds_match,
    assert_kv_cache_parity,
    assert_logits_to_keep,
    assert_long_context_consistent,
    assert_output_shapes,
    assert_padding_invariant,
    assert_prefix_causal,
    assert_prompt_special_tokens,
    assert_same_continuation,
    assert_special_tokens_agree,
    assert_static_cache_matches,
    assert_tokenizer_round_trip,
    assert_turn_terminator_stops_generation,
    assert_vocab_alignment,
    assert_weights_loaded,
    greedy_loop,
    load_score_head_classifier,
)
from .invariants import Invariant, invariant_for_test, invariants, register_invariant, suite_test
from .loading import CausalLM, CheckpointLoadError, Target
from .precision import NoiseFloor, calibrated_tolerance, measure_noise_floor
from .session import CausalLMSession, session_of
from .snapshot import behaviour_record
from .tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TOLERANCES",
    "CausalLM",
    "CausalLMSession",
    "CheckResult",
    "CheckpointLoadError",
    "GenerationConfigWarning",
    "Invariant",
    "NearTieWarning",
    "NoiseFloor",
    "Target",
    "Tolerance",
    "assert_assisted_decoding_matches",
    "assert_attention_implementations_agree",
    "assert_batch_independent",
    "assert_cache_effective",
    "assert_chat_markers_are_tokens",
    "assert_chat_template_consistent",
    "assert_classification_head_equivalent",
    "assert_close_to_reference",
    "assert_continuation_matches",
    "assert_deterministic",
    "assert_dtype_parity",
    "assert_finite_logits",
    "assert_generation_matches_forward",
    "assert_generation_prompt_opens_the_answer",
    "assert_greedy_parity",
    "assert_inputs_embeds_match",
    "assert_kv_cache_parity",
    "assert_logits_to_keep",
    "assert_long_context_consistent",
    "assert_output_shapes",
    "assert_padding_invariant",
    "assert_prefix_causal",
    "assert_prompt_special_tokens",
    "assert_same_continuation",
    "assert_special_tokens_agree",
    "assert_static_cache_matches",
    "assert_tokenizer_round_trip",
    "assert_turn_terminator_stops_generation",
    "assert_vocab_alignment",
    "assert_weights_loaded",
    "behaviour_record",
    "benchmark_generation",
    "calibrated_tolerance",
    "forced_generate",
    "greedy_loop",
    "invariant_for_test",
    "invariants",
    "load_score_head_classifier",
    "measure_noise_floor",
    "register_invariant",
    "session_of",
    "suite_test",
    "tolerance_for",
]
