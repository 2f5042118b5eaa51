"""Families of invariants, one module per family (named as its ``-m causal_lm_<family>`` marker); each helper
raises AssertionError with a full message. Shared machinery lives in ``_common`` (messages, score comparison),
``_generation`` (greedy loops, ``generate`` with scores, paths transformers refuses) and ``_probes`` (what two
placements of a checkpoint must agree on)."""

from ._common import CheckResult
from ._generation import (
    NearTieWarning,
    assert_generation_matches_forward,
    assert_same_continuation,
    greedy_loop,
)
from .attention import assert_attention_implementations_agree
from .beam import assert_beam_search_consistent
from .cache import assert_cache_effective, assert_kv_cache_parity, assert_static_cache_matches
from .causality import assert_prefix_causal
from .chat import (
    assert_chat_markers_are_tokens,
    assert_chat_template_consistent,
    assert_chat_turns_rendered,
    assert_generation_prompt_opens_the_answer,
    assert_turn_terminator_stops_generation,
)
from .classification import assert_classification_head_equivalent, load_score_head_classifier
from .context import assert_far_positions_consistent, assert_long_context_consistent, assert_long_prefill_consistent
from .determinism import assert_deterministic
from .distributed import assert_device_map_parity, assert_tensor_parallel_matches, single_device_room
from .embeddings import assert_inputs_embeds_match
from .equivalence import assert_equivalent_paths_agree
from .generation import (
    GenerationConfigWarning,
    assert_assisted_decoding_matches,
    assert_continuation_matches,
    assert_generation_defaults,
    assert_greedy_parity,
)
from .packing import assert_packed_sequences_consistent
from .padding import assert_batch_independent, assert_padding_invariant
from .precision import assert_dtype_parity
from .reference import assert_close_to_reference
from .sampling import assert_sampling_consistent
from .shapes import assert_finite_logits, assert_logits_to_keep, assert_output_shapes
from .tokenizer import (
    assert_decoded_answer_has_no_markers,
    assert_prompt_special_tokens,
    assert_streamed_decode_matches,
    assert_tokenizer_round_trip,
)
from .training import assert_training_step_consistent
from .vocab import assert_special_tokens_agree, assert_vocab_alignment
from .weights import assert_knows_language, assert_weights_loaded

__all__ = [
    "CheckResult",
    "GenerationConfigWarning",
    "NearTieWarning",
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
    "greedy_loop",
    "load_score_head_classifier",
    "single_device_room",
]
