"""pytest-causal-lm: invariants every correct causal language model satisfies.

The public API is ``__all__``: the ``assert_*`` helpers, the ``CausalLM`` handle
the ``causal_lm`` fixture yields, the invariant registry, the session state and
the tolerance table. Importing this package does not import torch or
transformers; the helpers import them when called.
"""

from typing import TYPE_CHECKING, Any

from . import builtin  # noqa: F401  (importing it registers the built-in invariants)
from .benchmark import benchmark_generation, forced_generate
from .loading import CausalLM, CheckpointLoadError
from .precision import NoiseFloor, calibrated_tolerance, measure_noise_floor
from .registry import Invariant, invariant_for_test, invariants, register_invariant, suite_test
from .session import CausalLMSession, session_of
from .snapshot import behaviour_record
from .targets import Target
from .tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for

if TYPE_CHECKING:  # at run time the helpers come from pytest_causal_lm.checks on first use (see there why)
    from .checks import (
        CheckResult,
        GenerationConfigWarning,
        NearTieWarning,
        assert_assisted_decoding_matches,
        assert_attention_implementations_agree,
        assert_batch_independent,
        assert_beam_search_consistent,
        assert_cache_effective,
        assert_chat_markers_are_tokens,
        assert_chat_template_consistent,
        assert_chat_turns_rendered,
        assert_classification_head_equivalent,
        assert_close_to_reference,
        assert_continuation_matches,
        assert_decoded_answer_has_no_markers,
        assert_deterministic,
        assert_device_map_parity,
        assert_dtype_parity,
        assert_equivalent_paths_agree,
        assert_far_positions_consistent,
        assert_finite_logits,
        assert_generation_defaults,
        assert_generation_matches_forward,
        assert_generation_prompt_opens_the_answer,
        assert_greedy_parity,
        assert_inputs_embeds_match,
        assert_knows_language,
        assert_kv_cache_parity,
        assert_logits_to_keep,
        assert_long_context_consistent,
        assert_long_prefill_consistent,
        assert_output_shapes,
        assert_packed_sequences_consistent,
        assert_padding_invariant,
        assert_prefix_causal,
        assert_prompt_special_tokens,
        assert_same_continuation,
        assert_sampling_consistent,
        assert_special_tokens_agree,
        assert_static_cache_matches,
        assert_streamed_decode_matches,
        assert_tensor_parallel_matches,
        assert_tokenizer_round_trip,
        assert_training_step_consistent,
        assert_turn_terminator_stops_generation,
        assert_vocab_alignment,
        assert_weights_loaded,
        greedy_loop,
        load_score_head_classifier,
    )

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
    "assert_beam_search_consistent",
    "assert_cache_effective",
    "assert_chat_markers_are_tokens",
    "assert_chat_template_consistent",
    "assert_chat_turns_rendered",
    "assert_classification_head_equivalent",
    "assert_close_to_reference",
    "assert_continuation_matches",
    "assert_decoded_answer_has_no_markers",
    "assert_deterministic",
    "assert_device_map_parity",
    "assert_dtype_parity",
    "assert_equivalent_paths_agree",
    "assert_far_positions_consistent",
    "assert_finite_logits",
    "assert_generation_defaults",
    "assert_generation_matches_forward",
    "assert_generation_prompt_opens_the_answer",
    "assert_greedy_parity",
    "assert_inputs_embeds_match",
    "assert_knows_language",
    "assert_kv_cache_parity",
    "assert_logits_to_keep",
    "assert_long_context_consistent",
    "assert_long_prefill_consistent",
    "assert_output_shapes",
    "assert_packed_sequences_consistent",
    "assert_padding_invariant",
    "assert_prefix_causal",
    "assert_prompt_special_tokens",
    "assert_same_continuation",
    "assert_sampling_consistent",
    "assert_special_tokens_agree",
    "assert_static_cache_matches",
    "assert_streamed_decode_matches",
    "assert_tensor_parallel_matches",
    "assert_tokenizer_round_trip",
    "assert_training_step_consistent",
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


def __getattr__(name: str) -> Any:
    from . import checks

    if name in checks.__all__:
        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
