"""Families of invariants, one module per family (named as its ``-m causal_lm_<family>`` marker); each helper
raises AssertionError with a full message. Shared machinery lives in ``_common`` (messages, score comparison),
``_generation`` (greedy loops, ``generate`` with scores, paths transformers refuses) and ``_probes`` (what two
placements of a checkpoint must agree on).

Importing the package imports none of these modules: pytest imports the plugin in every project where it is
installed, and each module it imports is parsed and assertion-rewritten on every run where bytecode is not cached
(``PYTHONDONTWRITEBYTECODE``, common in containers). Each name is imported from its module on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers and readers
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

# Where each public name lives: the one runtime list (tests/test_registry.py checks it against the imports above).
_MODULES: dict[str, tuple[str, ...]] = {
    "_common": ("CheckResult",),
    "_generation": (
        "NearTieWarning",
        "assert_generation_matches_forward",
        "assert_same_continuation",
        "greedy_loop",
    ),
    "attention": ("assert_attention_implementations_agree",),
    "beam": ("assert_beam_search_consistent",),
    "cache": (
        "assert_cache_effective",
        "assert_kv_cache_parity",
        "assert_static_cache_matches",
    ),
    "causality": ("assert_prefix_causal",),
    "chat": (
        "assert_chat_markers_are_tokens",
        "assert_chat_template_consistent",
        "assert_chat_turns_rendered",
        "assert_generation_prompt_opens_the_answer",
        "assert_turn_terminator_stops_generation",
    ),
    "classification": (
        "assert_classification_head_equivalent",
        "load_score_head_classifier",
    ),
    "context": (
        "assert_far_positions_consistent",
        "assert_long_context_consistent",
        "assert_long_prefill_consistent",
    ),
    "determinism": ("assert_deterministic",),
    "distributed": (
        "assert_device_map_parity",
        "assert_tensor_parallel_matches",
        "single_device_room",
    ),
    "embeddings": ("assert_inputs_embeds_match",),
    "equivalence": ("assert_equivalent_paths_agree",),
    "generation": (
        "GenerationConfigWarning",
        "assert_assisted_decoding_matches",
        "assert_continuation_matches",
        "assert_generation_defaults",
        "assert_greedy_parity",
    ),
    "packing": ("assert_packed_sequences_consistent",),
    "padding": (
        "assert_batch_independent",
        "assert_padding_invariant",
    ),
    "precision": ("assert_dtype_parity",),
    "reference": ("assert_close_to_reference",),
    "sampling": ("assert_sampling_consistent",),
    "shapes": (
        "assert_finite_logits",
        "assert_logits_to_keep",
        "assert_output_shapes",
    ),
    "tokenizer": (
        "assert_decoded_answer_has_no_markers",
        "assert_prompt_special_tokens",
        "assert_streamed_decode_matches",
        "assert_tokenizer_round_trip",
    ),
    "training": ("assert_training_step_consistent",),
    "vocab": (
        "assert_special_tokens_agree",
        "assert_vocab_alignment",
    ),
    "weights": (
        "assert_knows_language",
        "assert_weights_loaded",
    ),
}
_HOMES = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    module = _HOMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
