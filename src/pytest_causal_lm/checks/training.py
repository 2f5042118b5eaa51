"""The training step: what every fine-tuner calls, ``model(input_ids, labels=...)`` and its gradients.

The loss must be the mean cross-entropy of the model's own logits shifted by one, over the tokens whose label
is not ``-100``; a right-padded batch (as data collators pad) must give the token-weighted loss of its rows;
gradient checkpointing must change neither the loss nor the gradients; and in training mode, with no dropout
configured, the scores must be those of ``eval()``. The session's model is left as it was found.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    check_scores,
    encode,
    failure,
    mismatch_failure,
    pad_id,
    resolve_tolerance,
    transformers_refusal,
)
from ._localise import Replay, Side

__all__ = ["IGNORE_INDEX", "assert_training_step_consistent"]

IGNORE_INDEX = -100  # what transformers' loss and every data collator use for "no label here"
# The loss transformers returns and the one computed here come from the same logits, in float32: only the order
# of the sum differs, in every run dtype.
_SAME_LOGITS = 1e-4
_PROMPT_TOKENS = 3  # labels masked at the start of each row, as instruction tuning masks the prompt


def assert_training_step_consistent(
    model: Any, tokenizer: Any, *, texts: Sequence[str] = DEFAULT_TEXTS, tolerance: Tolerance | None = None
) -> CheckResult:
    """``labels=`` gives the mean shifted cross-entropy over unmasked tokens, alone and in a right-padded batch;
    gradient checkpointing changes neither loss nor gradients; gradients are finite; ``train()`` without dropout
    scores as ``eval()``. Only the input and output embeddings get gradients (memory stays near inference)."""
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    result = CheckResult("training step", tolerance=tolerance)
    with _restored(model):
        encoded = [encode(tokenizer, text, model.device) for text in texts]
        rows = [_labelled(ids) for ids in encoded if ids.shape[1] > _PROMPT_TOKENS + 1]
        alone = [_check_loss(model, ids, labels, result) for ids, labels in rows]
        _check_padded_batch(model, tokenizer, rows, alone, result)
        _check_checkpointing(model, *rows[0], result)
        _check_train_mode_scores(model, tokenizer, rows[0][0], result)
    return result


def _labelled(ids: Any) -> tuple[Any, Any]:
    labels = ids.clone()
    labels[:, :_PROMPT_TOKENS] = IGNORE_INDEX
    return ids, labels


@contextmanager
def _restored(model: Any) -> Iterator[None]:
    """Give back the model as found: its mode, which parameters want gradients, checkpointing off, no gradients."""
    training = model.training
    wanted = {name: p.requires_grad for name, p in model.named_parameters()}
    checkpointing = _checkpointing_on(model)
    try:
        yield
    finally:
        if not checkpointing and _checkpointing_on(model):
            _set_checkpointing(model, False)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(wanted[name])
            parameter.grad = None
        model.train(training)


def _checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on, under either version's name (renamed in 5.25)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _set_checkpointing(model: Any, on: bool) -> None:
    """Turn checkpointing on (non-reentrant, as trainers do) or off, under the installed version's names."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
    elif renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _loss(model: Any, ids: Any, labels: Any, **kwargs: Any) -> Any:
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, **kwargs)
    if out.loss is None:
        raise failure(f"{type(model).__name__}(input_ids, labels=...) returned no loss", model, [("labels", "given")])
    return out


def _shifted_cross_entropy(logits: Any, labels: Any) -> Any:
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def _check_loss(model: Any, ids: Any, labels: Any, result: CheckResult) -> float:
    """The returned loss is the mean cross-entropy of the returned logits, shifted by one, over labelled tokens."""
    import torch.nn.functional as F

    model.eval()
    out = _loss(model, ids, labels)
    expected = _shifted_cross_entropy(out.logits, labels)
    result.observe(expected, out.loss)
    if _close(float(out.loss), float(expected), _SAME_LOGITS):
        return float(out.loss)
    vocab = out.logits.shape[-1]
    unshifted = F.cross_entropy(out.logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    every_token = _shifted_cross_entropy(out.logits, ids)
    cause = (
        "the labels are not shifted: position t is scored against label t, not t + 1"
        if _close(float(out.loss), float(unshifted), _SAME_LOGITS)
        else f"labels of {IGNORE_INDEX} are counted (prompt tokens are not masked out)"
        if _close(float(out.loss), float(every_token), _SAME_LOGITS)
        else "the loss is not the mean cross-entropy of the logits it returns"
    )
    raise failure(
        "training step: the loss from labels= is not the mean cross-entropy of the logits shifted by one",
        model,
        [
            ("row", f"{ids.shape[1]} tokens, labels {IGNORE_INDEX} at positions 0..{_PROMPT_TOKENS - 1}"),
            ("loss returned", f"{float(out.loss):.6g}"),
            ("expected", f"{float(expected):.6g} (difference {abs(float(out.loss) - float(expected)):.3g})"),
            ("unshifted", f"{float(unshifted):.6g}"),
            (f"counting {IGNORE_INDEX}", f"{float(every_token):.6g}"),
            ("likely cause", cause),
        ],
        figure=("Δ loss", abs(float(out.loss) - float(expected))),
        tolerance=result.tolerance,
    )


def _close(actual: float, expected: float, atol: float) -> bool:
    """Losses compare absolutely: a mean cross-entropy moves by no more than the scores under it, so the run
    dtype's score atol bounds two computations of one loss; the relative part of a score tolerance does not apply."""
    return abs(actual - expected) <= atol


def _check_padded_batch(
    model: Any, tokenizer: Any, rows: list[tuple[Any, Any]], alone: list[float], result: CheckResult
) -> None:
    """Right padding (labels -100 there, mask 0) gives the token-weighted mean of the rows' losses."""
    import torch

    width = max(ids.shape[1] for ids, _ in rows)
    pad = pad_id(model, tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=rows[0][0].dtype, device=rows[0][0].device)
    labels, mask = torch.full_like(ids, IGNORE_INDEX), torch.zeros_like(ids)
    for row, (row_ids, row_labels) in enumerate(rows):
        ids[row, : row_ids.shape[1]], labels[row, : row_ids.shape[1]] = row_ids[0], row_labels[0]
        mask[row, : row_ids.shape[1]] = 1
    batch = _loss(model, ids, labels, attention_mask=mask).loss
    counts = [int((row_labels[:, 1:] != IGNORE_INDEX).sum()) for _, row_labels in rows]
    expected = sum(loss * n for loss, n in zip(alone, counts, strict=True)) / sum(counts)
    result.observe(torch.tensor(expected), batch)
    if not _close(float(batch), expected, result.tolerance.atol):
        raise failure(
            "training step: a right-padded batch's loss is not the token-weighted loss of its rows",
            model,
            [
                ("batch", f"{len(rows)} rows of {[r.shape[1] for r, _ in rows]} tokens, right-padded with id {pad}"),
                ("loss returned", f"{float(batch):.6g}"),
                ("expected", f"{expected:.6g} (rows alone: {', '.join(f'{x:.4g}' for x in alone)}; tokens {counts})"),
                ("difference", f"{abs(float(batch) - expected):.3g}"),
                ("likely cause", "padding reaches the loss or the real tokens (attention_mask or -100 not honoured)"),
            ],
            figure=("Δ loss", abs(float(batch) - expected)),
            tolerance=result.tolerance,
        )


def _ends(model: Any) -> list[tuple[str, Any]]:
    """The input and output embeddings: every loss depends on both, and the input's gradient crosses every layer
    (so a graph broken anywhere under checkpointing shows there)."""
    names = {id(p): name for name, p in model.named_parameters()}
    ends = [
        getattr(model.get_input_embeddings(), "weight", None),
        getattr(model.get_output_embeddings(), "weight", None),
    ]
    return list({id(p): (names[id(p)], p) for p in ends if p is not None and id(p) in names}.values())


def _gradients(model: Any, ids: Any, labels: Any, seed: int = 0) -> tuple[float, dict[str, Any]]:
    """Loss and the gradients of ``_ends`` in training mode (dropout seeded, so both runs draw the same masks)."""
    import torch

    model.train()
    for _, parameter in model.named_parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    ends = _ends(model)
    for _, parameter in ends:
        parameter.requires_grad_(True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss  # no cache is built while training
    loss.backward()
    grads = {
        name: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros(p.shape)) for name, p in ends
    }
    return float(loss.detach()), grads


def _check_checkpointing(model: Any, ids: Any, labels: Any, result: CheckResult) -> None:
    """Gradient checkpointing recomputes the forward in backward: the loss and every gradient stay the same."""
    plain_loss, plain = _gradients(model, ids, labels)
    _require_finite(model, plain, "without gradient checkpointing")
    try:
        _set_checkpointing(model, True)
    except Exception as exc:  # transformers' own refusal is a note; anything else fails
        words = transformers_refusal(exc)
        if words is None:
            raise
        result.note(f"gradient checkpointing not compared: {words}")
        return
    checkpointed_loss, checkpointed = _gradients(model, ids, labels)
    _set_checkpointing(model, False)
    _require_finite(model, checkpointed, "with gradient checkpointing")
    if not _close(checkpointed_loss, plain_loss, result.tolerance.atol):
        raise failure(
            "training step: gradient checkpointing changes the loss",
            model,
            [("loss without", f"{plain_loss:.6g}"), ("loss with", f"{checkpointed_loss:.6g}")],
            figure=("Δ loss", abs(checkpointed_loss - plain_loss)),
            tolerance=result.tolerance,
        )
    for name, expected in plain.items():
        _compare_gradient(model, name, expected, checkpointed[name], result)


def _compare_gradient(model: Any, name: str, expected: Any, actual: Any, result: CheckResult) -> None:
    """Equal within the run dtype's relative tolerance of the gradient's own scale (gradients are not logits)."""
    import torch

    scale = float(expected.abs().max())
    difference = (actual - expected).abs()
    if float(difference.max()) <= result.tolerance.rtol * max(scale, 1e-12) + 1e-12:
        return
    flat = int(difference.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(expected.shape)))
    without, with_ = float(expected.flatten()[flat]), float(actual.flatten()[flat])
    raise failure(
        f"training step: gradient checkpointing changes the gradient of {name}",
        model,
        [
            ("parameter", f"{name} {tuple(expected.shape)}"),
            ("worst element", f"{where}: without {without:.6g}, with {with_:.6g}"),
            ("greatest |difference|", f"{float(difference.max()):.3g} (gradient scale {scale:.3g})"),
            (
                "likely cause",
                "a layer's forward under checkpointing differs from its plain forward "
                "(an argument dropped or a tensor detached at the checkpoint boundary)",
            ),
        ],
        figure=("Δ grad", float(difference.max())),
        tolerance=result.tolerance,
    )


def _require_finite(model: Any, grads: dict[str, Any], how: str) -> None:
    bad = [name for name, grad in grads.items() if not bool(grad.isfinite().all())]
    if bad:
        raise failure(
            f"training step: non-finite gradients {how}",
            model,
            [("parameters", ", ".join(bad)), ("likely cause", "an overflow in the backward pass (half precision?)")],
        )


def _dropout(model: Any) -> list[str]:
    """Modules and config fields that apply dropout in training mode."""
    import torch

    modules = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = model.config.get_text_config()
    fields = [key for key, value in vars(config).items() if "dropout" in key and isinstance(value, float) and value > 0]
    return modules[:3] + fields


def _check_train_mode_scores(model: Any, tokenizer: Any, ids: Any, result: CheckResult) -> None:
    """With no dropout configured, ``train()`` scores as ``eval()``: a difference is randomness or a training-only
    path in the forward."""
    import torch

    dropout = _dropout(model)
    if dropout:
        result.note(f"train() vs eval() not compared: dropout is configured ({', '.join(dropout)})")
        return
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits[0].float()
        model.train()
        trained = model(input_ids=ids).logits[0].float()
    mismatch = check_scores(result, evaluated, trained, result.tolerance)
    if mismatch:

        def in_mode(training: bool) -> Any:
            return lambda: model.train(training)(input_ids=ids)

        replay = Replay(Side("eval()", in_mode(False)), Side("train()", in_mode(True)), (mismatch.first_position,))
        raise mismatch_failure(
            f"training step: train() scores differ from eval() with no dropout configured, from position {mismatch.first_position}",
            model,
            tokenizer,
            [("likely cause", "randomness or a training-only path in the forward (dropout hard-coded, noise)")],
            mismatch,
            result.tolerance,
            replay=replay,
        )
