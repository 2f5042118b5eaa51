"""Classification-head equivalence: a sequence classifier whose ``score`` is the ``lm_head`` is the causal LM.

The tutorial loads ``AutoModelForSequenceClassification`` with
``num_labels=vocab_size`` and ``key_mapping={"lm_head.weight": "score.weight"}``,
then generates text with it. Its scores must equal the causal LM's scores at
the last (non-padding) position, and its argmax loop must reproduce ``generate``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    eos_ids,
    failure,
    forward_logits,
    mismatch_failure,
    pad_id,
    padded_batch,
    resolve_tolerance,
)
from ._generation import compare_continuations, greedy_generate, greedy_loop
from .weights import grouped_keys, module_name

__all__ = ["assert_classification_head_equivalent", "load_score_head_classifier"]

# Config attributes of architectures whose causal head transforms scores after lm_head.
HEAD_TRANSFORMS = {
    "final_logit_softcapping": "final logit soft-capping",
    "logit_scale": "logit scaling",
    "logits_scaling": "logit scaling",
    "output_multiplier": "output multiplier",
    "lm_head_multiplier": "lm_head multiplier",
}


def head_transforms(model: Any) -> dict[str, Any]:
    """Non-trivial score transforms that the causal head applies and a plain score head does not."""
    config = model.config.get_text_config()
    found = {}
    for name in HEAD_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value is not False and value != 1 and value != 1.0:
            found[name] = value
    return found


def load_score_head_classifier(
    model: Any,
    source: str | None = None,
    *,
    loading_info: Mapping[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, list[str]]:
    """Load the tutorial's classifier for ``model``'s checkpoint: ``score.weight`` is ``lm_head.weight``.

    With tied embeddings ``lm_head.weight`` is not stored and the mapping finds nothing: the score head is then
    the embeddings the classifier loaded from the same files. A head the files do not hold is never filled in
    from the causal LM (whose head would then be random too, and agree with it): that fails, unless
    ``loading_info`` (the causal LM's own) shows the causal load found the head under a name the mapping missed.
    Returns (classifier, notes). Skips when the architecture has no last-token classifier.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = model.config
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not getattr(
        config, "auto_map", {}
    ).get("AutoModelForSequenceClassification"):
        pytest.skip(f"{config.model_type} has no sequence-classification class in transformers")
    vocab_size = config.get_text_config().vocab_size
    # the tutorial maps lm_head.weight; architectures that name their head otherwise (GPT-NeoX: embed_out) too
    head_name = module_name(model, model.get_output_embeddings())
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        source or model.name_or_path,
        num_labels=vocab_size,
        key_mapping={rf"^{re.escape(head_name)}\.weight$": "score.weight"},
        output_loading_info=True,
        dtype=model.dtype,
        **from_pretrained_kwargs,
    )
    score = getattr(classifier, "score", None)
    if not isinstance(score, torch.nn.Linear) or tuple(score.weight.shape) != (
        vocab_size,
        config.get_text_config().hidden_size,
    ):
        pytest.skip(
            f"{type(classifier).__name__} has no last-token linear score head (it pools another way, e.g. the first "
            "token through a pooler), so the lm_head cannot become its classifier"
        )
    notes = _fill_score_head(model, classifier, info, head_name, loading_info)
    classifier.to(model.device).eval()
    classifier.requires_grad_(False)
    return classifier, notes


def _fill_score_head(
    model: Any, classifier: Any, info: Mapping[str, Any], head_name: str, causal_info: Mapping[str, Any] | None
) -> list[str]:
    """Check the classifier's own loading report; give score.weight the stored head when the mapping found none."""
    __tracebackhide__ = True
    import torch

    missing = [str(key) for key in info.get("missing_keys", ())]
    random = [key for key in missing if not key.endswith("score.weight")]
    if random:
        raise failure(
            f"{type(classifier).__name__} loads the checkpoint with {len(random)} randomly initialised tensors",
            model,
            [("missing keys", grouped_keys(random))],
        )
    if len(missing) == len(random):
        return []
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head_loaded = causal_info is not None and f"{head_name}.weight" not in causal_info.get("missing_keys", ())
    if not tied and not head_loaded:
        raise failure(
            f"the checkpoint stores no {head_name}.weight and the config does not tie it to the embeddings: the "
            "classifier's score head would be random",
            model,
            [("likely cause", "the causal LM's head is random too: see the weights-loaded invariant")],
        )
    stored = classifier.get_input_embeddings().weight if tied else model.get_output_embeddings().weight
    with torch.no_grad():
        classifier.score.weight.copy_(stored.to(classifier.score.weight.device))
    if tied:
        return [f"{head_name}.weight is not stored (tied embeddings): score.weight is the stored embeddings"]
    return [f"the checkpoint stores the head under another name than {head_name}.weight: copied from the causal LM"]


def assert_classification_head_equivalent(
    model: Any,
    tokenizer: Any,
    classifier: Any = None,
    *,
    source: str | None = None,
    loading_info: Mapping[str, Any] | None = None,
    prompts: Sequence[str] = DEFAULT_TEXTS,
    max_new_tokens: int = 8,
    tolerance: Tolerance | None = None,
    **from_pretrained_kwargs: Any,
) -> CheckResult:
    """The score-head classifier gives the causal LM's last-position scores, and its argmax loop equals ``generate``.

    Checked per prompt, in a left-padded and a right-padded batch (the classifier
    pools the last non-padding token), then generation by classification.
    ``classifier`` defaults to ``load_score_head_classifier(model, source, loading_info=loading_info, ...)``.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("classification-head equivalence", tolerance=tolerance)
    if classifier is None:
        classifier, notes = load_score_head_classifier(
            model, source, loading_info=loading_info, **from_pretrained_kwargs
        )
        for note in notes:
            result.note(note)
    classifier.config.pad_token_id = pad_id(model, tokenizer)
    alone = _check_single_prompts(model, tokenizer, classifier, prompts, result)
    for side in ("left", "right"):
        _check_padded_batch(model, tokenizer, classifier, prompts, alone, side, result)
    for text in prompts[:2]:
        _check_generation_by_classification(model, tokenizer, classifier, text, max_new_tokens, result)
    return result


def _head_failure(
    model: Any, tokenizer: Any, title: str, details: list[tuple[str, object]], mismatch: Any, tolerance: Tolerance
) -> BaseException:
    """A failure, or a skip naming the transform when the causal head transforms scores after lm_head by design."""
    transforms = head_transforms(model)
    if transforms:
        named = ", ".join(f"{HEAD_TRANSFORMS[name]} ({name}={value})" for name, value in transforms.items())
        return pytest.skip.Exception(
            f"{type(model).__name__} applies {named} to its scores after lm_head; a plain score head does not, "
            f"so the two differ by design (greatest difference {mismatch.greatest_difference:.3g})"
        )
    return mismatch_failure(
        f"classification head is not equivalent to the causal LM: {title}",
        model,
        tokenizer,
        details,
        mismatch,
        tolerance,
        position_label="row",
    )


def _check_single_prompts(
    model: Any, tokenizer: Any, classifier: Any, prompts: Sequence[str], result: CheckResult
) -> list[Any]:
    """Each prompt alone: the classifier's scores equal the causal LM's last-position scores. Returns the latter."""
    __tracebackhide__ = True
    import torch

    alone = []
    for text in prompts:
        ids = encode(tokenizer, text, model.device)
        expected = forward_logits(model, ids)[0, -1:]
        alone.append(expected)
        with torch.no_grad():
            actual = classifier(input_ids=ids).logits.float()
        mismatch = check_scores(result, expected, actual, result.tolerance)
        if mismatch:
            title = f"scores for {text!r} differ from the last-position scores"
            raise _head_failure(model, tokenizer, title, [("prompt", repr(text))], mismatch, result.tolerance)
    return alone


def _check_padded_batch(
    model: Any,
    tokenizer: Any,
    classifier: Any,
    prompts: Sequence[str],
    alone: list[Any],
    side: str,
    result: CheckResult,
) -> None:
    """The prompts padded on ``side`` into one batch: each row equals the prompt's own last-position scores."""
    __tracebackhide__ = True
    import torch

    pad = classifier.config.pad_token_id
    ids, mask, positions = padded_batch(tokenizer, prompts, model.device, pad, side=side)
    extra = {"position_ids": positions} if side == "left" else {}
    with torch.no_grad():
        batch_scores = classifier(input_ids=ids, attention_mask=mask, **extra).logits.float()
    for row, expected in enumerate(alone):
        mismatch = check_scores(result, expected, batch_scores[row : row + 1], result.tolerance)
        if mismatch:
            title = (
                f"{side}-padded batch row {row} ({prompts[row]!r}) differs from the prompt's last-position scores "
                "(the classifier must pool the last non-padding token)"
            )
            details: list[tuple[str, object]] = [("batch", f"{len(prompts)} prompts, {side}-padded with id {pad}")]
            raise _head_failure(model, tokenizer, title, details, mismatch, result.tolerance)


def _check_generation_by_classification(
    model: Any, tokenizer: Any, classifier: Any, text: str, max_new_tokens: int, result: CheckResult
) -> None:
    """The tutorial's loop: argmax of the classifier, append, repeat; it must give ``generate``'s tokens."""
    __tracebackhide__ = True
    ids = encode(tokenizer, text, model.device)
    scorer = partial(_classify_unpadded, classifier)
    by_classification = greedy_loop(
        model, ids, max_new_tokens=max_new_tokens, stop_ids=eos_ids(model, tokenizer), scorer=scorer
    )
    generated = greedy_generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)[0]
    compare_continuations(
        model,
        tokenizer,
        ids,
        by_classification,
        generated,
        reference_label="classification loop",
        other_label="model.generate",
        tolerance=result.tolerance,
        result=result,
        title=f"generation by classification differs from generate ({text!r})",
    )


def _classify_unpadded(classifier: Any, ids: Any) -> Any:
    """Scores of one unpadded row, pooled at its last position.

    Every token of the row is real, a generated pad token too; with pad_token_id set,
    the classifier would skip generated pad tokens and pool an earlier one.
    """
    configs = [classifier.config, classifier.config.get_text_config()]
    pad = classifier.config.pad_token_id
    for config in configs:
        config.pad_token_id = None
    try:
        return classifier(input_ids=ids).logits[0]
    finally:
        for config in configs:
            config.pad_token_id = pad
