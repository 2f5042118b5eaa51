"""Weights as loaded: nothing the checkpoint stores was dropped, nothing the model needs was invented.

``from_pretrained`` fills a tensor the files lack with random numbers and throws away a tensor the class has
no module for, and only logs it. The model then agrees with itself perfectly and predicts garbage. The loader's
own report (``output_loading_info=True``) already leaves out what the architecture declares ignorable
(``_keys_to_ignore_on_load_*``, rotary ``inv_freq`` and ``position_ids`` buffers, tied heads); whatever it
still lists is a defect. (A config that ties a head the files store with other values is not tied by the loader
from 5.0 on, so that edit cannot drop a trained head.)

Knows language: a trained checkpoint: it predicts plain text far better than chance, and it copies.

A random head, a garbled conversion (the q/k rotary permutation forgotten, a wrong tokenizer shipped) or a
broken quantisation leaves a model that agrees with itself in every other invariant and predicts nothing.
Two reference-free signs of training catch it: the mean negative log-likelihood of built-in prose is far
below a uniform guess over the vocabulary (``log(vocab)``), and on random tokens repeated twice the second
copy is predicted far better than the first (the induction behaviour every trained LM above toy size has).
Checkpoints with random weights on purpose skip both (``--causal-lm-random-weights``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._common import CheckResult, encode, failure, next_token_nll, token

__all__ = ["KNOWN_TEXT", "assert_knows_language", "assert_weights_loaded", "grouped_keys", "module_name"]


_MEANINGS = {
    "missing_keys": "not in the checkpoint, so randomly initialised",
    "unexpected_keys": "stored in the checkpoint and thrown away: the class has no such module",
    "mismatched_keys": "stored with another shape, so randomly initialised",
    "error_msgs": "loader errors",
}


def grouped_keys(keys: Iterable[Any], limit: int = 6) -> str:
    """``model.layers.*.self_attn.q_norm.weight: 28, lm_head.weight: 1``: keys grouped by layer index."""
    names = [key[0] if isinstance(key, tuple | list) else str(key) for key in keys]
    counts = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names)
    shown = [f"{pattern}: {count}" for pattern, count in counts.most_common(limit)]
    rest = len(counts) - limit
    return ", ".join(shown) + (f", and {rest} more patterns" if rest > 0 else "")


def module_name(model: Any, module: Any) -> str:
    """The dotted name of ``module`` inside ``model`` (``lm_head``, ``model.embed_tokens``)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def assert_weights_loaded(model: Any, loading_info: Mapping[str, Any]) -> CheckResult:
    """Nothing is missing, unexpected or mismatched in ``loading_info`` (``from_pretrained(...,
    output_loading_info=True)``'s second value). Failures group the keys and name a likely cause."""
    __tracebackhide__ = True
    found = {kind: list(keys) for kind, keys in loading_info.items() if keys}
    if found:
        rows: list[tuple[str, object]] = [
            (kind.replace("_", " "), f"{len(keys)} ({_MEANINGS.get(kind, kind)}): {grouped_keys(keys)}")
            for kind, keys in found.items()
        ]
        causes = _likely_causes(model, found)
        raise failure(
            f"the checkpoint's weights do not fit {type(model).__name__}: "
            + ", ".join(f"{len(keys)} {kind.replace('_', ' ')}" for kind, keys in found.items()),
            model,
            [*rows, *(("likely cause", cause) for cause in causes)],
            figure=("keys", float(sum(len(keys) for keys in found.values()))),
        )
    result = CheckResult("weights loaded")
    result.note("every tensor the model needs was stored, and every stored tensor was used")
    return result


def _likely_causes(model: Any, found: dict[str, list[Any]]) -> list[str]:
    missing = [str(k) for k in found.get("missing_keys", [])]
    unexpected = [str(k) for k in found.get("unexpected_keys", [])]
    causes = [_renamed_prefix(missing, unexpected), _untied_head(model, missing)]
    if unexpected and not causes[0]:
        causes.append(_sibling_architectures(model, unexpected))
    return [cause for cause in causes if cause]


def _renamed_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """Most stored keys are the expected ones under another prefix (``base_model.model.`` from a PEFT merge)."""
    renames: Counter[tuple[str, str]] = Counter()
    for stored in unexpected:
        for expected in missing:
            tail = _common_tail(stored, expected)
            if tail and "." in tail:
                renames[(stored[: len(stored) - len(tail)], expected[: len(expected) - len(tail)])] += 1
    if not renames:
        return None
    (stored_prefix, expected_prefix), count = renames.most_common(1)[0]
    if count < max(1, len(missing) // 2):
        return None
    return (
        f"a renamed prefix: {count} stored keys start with {stored_prefix!r} where the model expects "
        f"{expected_prefix!r} (re-save with the expected names, or pass key_mapping to from_pretrained)"
    )


def _common_tail(a: str, b: str) -> str:
    """The longest common dotted suffix of two keys."""
    parts_a, parts_b = a.split("."), b.split(".")
    common = 0
    while common < min(len(parts_a), len(parts_b)) and parts_a[-1 - common] == parts_b[-1 - common]:
        common += 1
    return ".".join(parts_a[len(parts_a) - common :]) if common else ""


def _untied_head(model: Any, missing: list[str]) -> str | None:
    head = model.get_output_embeddings()
    if head is None or f"{module_name(model, head)}.weight" not in missing:
        return None
    embeddings = f"{module_name(model, model.get_input_embeddings())}.weight"
    if embeddings in missing:
        return None
    return (
        f"the config does not tie the head to the embeddings (tie_word_embeddings="
        f"{getattr(model.config.get_text_config(), 'tie_word_embeddings', None)}) and the checkpoint stores no "
        f"{module_name(model, head)}.weight: the model was trained with tied embeddings (set tie_word_embeddings: "
        "true in config.json) or a conversion dropped the head"
    )


def _sibling_architectures(model: Any, unexpected: list[str]) -> str | None:
    """Architectures in transformers whose modeling code defines the modules the stored keys need."""
    import transformers

    needed = {key.split(".")[-2] for key in unexpected if key.count(".") >= 1}
    own = {name.split(".")[-1] for name, _ in model.named_modules() if name}
    needed -= own
    if not needed:
        return None
    models = Path(transformers.__file__).parent / "models"
    sources = {path: path.read_text(errors="replace") for path in models.glob("*/modeling_*.py")}
    having = [
        path.parent.name
        for path, text in sorted(sources.items(), key=lambda item: len(item[1]))  # the plainest first
        if all(f"self.{name} =" in text for name in needed | {n for n in own if not n.isdigit()})
    ]
    if not having:
        return f"{type(model).__name__} has no module named {', '.join(sorted(needed))}"
    return (
        f"{type(model).__name__} has no module named {', '.join(sorted(needed))}, which the stored weights have: the "
        f"config names the wrong architecture; model types that have them: {', '.join(having[:6])}"
    )


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
    nll = next_token_nll(model, ids)
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
    copy_nll = next_token_nll(model, repeated)
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
