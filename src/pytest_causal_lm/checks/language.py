"""A trained checkpoint knows language: it predicts plain text far better than chance, and it copies.

A random head, a garbled conversion (the q/k rotary permutation forgotten, a wrong tokenizer shipped) or a
broken quantisation leaves a model that agrees with itself in every other invariant and predicts nothing.
Two reference-free signs of training catch it: the mean negative log-likelihood of built-in prose is far
below a uniform guess over the vocabulary (``log(vocab)``), and on random tokens repeated twice the second
copy is predicted far better than the first (the induction behaviour every trained LM above toy size has).
Checkpoints with random weights on purpose skip both (``--causal-lm-random-weights``).
"""

from __future__ import annotations

import math
from typing import Any

from ._common import CheckResult, encode, failure, token

__all__ = ["KNOWN_TEXT", "assert_knows_language"]

KNOWN_TEXT = (
    "The sun rose slowly over the quiet village, and the first light fell across the fields. A farmer walked "
    "out to feed his animals, as he did every morning. His dog ran ahead of him, barking at the birds that "
    "flew up from the grass. In the kitchen, his wife was making breakfast for the children, who were still "
    "asleep upstairs. It was going to be a warm day, the kind of day when everyone in the village would want "
    "to spend time outside. After breakfast, the children went to school, and the farmer went back to work."
)
# Mean NLL of KNOWN_TEXT must stay below this share of log(vocab). Measured (float32): SmolLM2-135M-Instruct
# (Q4_1 GGUF) 2.9 nats of log(49152) = 10.8, i.e. 0.27; random tiny checkpoints 1.0 or more.
MAX_NLL_SHARE = 0.5
# Mean NLL on the repeated copy must stay below this share of the first copy's. SmolLM2-135M: 0.02.
MAX_COPY_SHARE = 0.5
COPY_LENGTH = 48


def _nll(model: Any, ids: Any) -> Any:
    """Per-position negative log-likelihood (nats) of each next token of ``ids`` (1, seq): shape (seq - 1,)."""
    import torch

    with torch.no_grad():
        scores = model(input_ids=ids).logits[0, :-1].float()
    return -scores.log_softmax(-1).gather(-1, ids[0, 1:, None].to(scores.device))[:, 0]


def _ordinary_ids(tokenizer: Any, vocab_size: int, count: int, seed: int) -> Any:
    """``count`` random ids of ordinary (not special, not added) tokens inside the model's vocabulary."""
    import torch

    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_encoder", {}).values())
    pool = torch.tensor([i for i in range(min(vocab_size, len(tokenizer))) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


def assert_knows_language(model: Any, tokenizer: Any, *, text: str = KNOWN_TEXT, seed: int = 0) -> CheckResult:
    """Mean NLL of ``text`` <= MAX_NLL_SHARE * log(vocab); on a random block repeated twice, the second copy's
    mean NLL <= MAX_COPY_SHARE * the first's. For trained checkpoints (random ones skip in the suite)."""
    __tracebackhide__ = True
    import torch

    vocab = model.config.get_text_config().vocab_size
    uniform = math.log(vocab)
    ids = encode(tokenizer, text, model.device)
    nll = _nll(model, ids)
    result = CheckResult("knows language", figure=("NLL", float(nll.mean())))
    result.note(f"prose: {float(nll.mean()):.2f} nats per token, a uniform guess {uniform:.2f}")
    if float(nll.mean()) > MAX_NLL_SHARE * uniform:
        worst = int(nll.argmax())
        raise failure(
            f"the model predicts plain prose no better than chance: mean NLL {float(nll.mean()):.2f} nats per token "
            f"> {MAX_NLL_SHARE} x log(vocab {vocab}) = {MAX_NLL_SHARE * uniform:.2f}",
            model,
            [
                ("text", f"{ids.shape[1]} tokens of built-in prose: {text[:60]!r}..."),
                (
                    "worst position",
                    f"{worst + 1}: {token(tokenizer, int(ids[0, worst + 1]))}, NLL {float(nll[worst]):.2f}",
                ),
                ("likely cause", _LIKELY),
            ],
            figure=result.figure,
        )
    block = _ordinary_ids(tokenizer, vocab, COPY_LENGTH, seed).to(model.device)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    repeated = torch.cat([torch.tensor(bos, dtype=block.dtype, device=model.device), block, block])[None]
    copy_nll = _nll(model, repeated)
    first = copy_nll[len(bos) : len(bos) + COPY_LENGTH - 1].mean()
    second = copy_nll[len(bos) + COPY_LENGTH :].mean()  # from the second copy's second token: the first is a guess
    result.note(f"copying: {float(second):.2f} nats per token on a repeated random block, {float(first):.2f} first")
    if float(second) > MAX_COPY_SHARE * float(first):
        raise failure(
            f"the model does not copy: on {COPY_LENGTH} random tokens repeated, the second copy's mean NLL "
            f"{float(second):.2f} > {MAX_COPY_SHARE} x the first copy's {float(first):.2f}",
            model,
            [("block starts", [token(tokenizer, int(i)) for i in block[:4]]), ("likely cause", _LIKELY)],
            figure=("NLL", float(second)),
        )
    return result


_LIKELY = (
    "random or garbled weights: a head or layers the loader initialised, a conversion that forgot a permutation "
    "(the q/k rotary layout), a broken quantisation, or a tokenizer from another model; a checkpoint with random "
    "weights on purpose should pass --causal-lm-random-weights"
)
