"""Reference comparison: how far a converted, quantised or fine-tuned checkpoint drifts from its reference.

The reference's outputs (next-token log-probabilities, greedy continuations,
perplexity) are computed once and kept as CPU tensors, so the reference model
can be freed before the candidate is compared against them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..tolerances import Tolerance
from ._common import failure, first_difference, kl_per_position, next_token_nll, resolve_tolerance, text_of, token
from ._generation import greedy_generate
from .tokenizer import ROUND_TRIP_CORPUS

__all__ = [
    "DEFAULT_THRESHOLDS",
    "REFERENCE_PROMPTS",
    "DriftReport",
    "ReferenceOutputs",
    "assert_close_to_reference",
    "compare_to_reference",
    "reference_outputs",
]

REFERENCE_PROMPTS: tuple[str, ...] = (
    "Hi dog how are you?",
    "Text generation is sequence classification in a for-loop.",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(",
    "1, 2, 3, 4, 5, 6,",
    "Question: What is 12 times 7?\nAnswer:",
    "The quick brown fox jumps over the lazy dog.",
    "To make a cup of tea, first",
    "Dear Sir or Madam,\n\nI am writing to",
    "The three primary colours are",
    "In 1969, the first humans landed on",
    "Bonjour, je m'appelle",
    "SELECT name, age FROM users WHERE",
    "The weather today is sunny and",
    "<html>\n  <body>\n    <h1>",
    "Translate to German: Good morning ->",
    "The mitochondria is the powerhouse of",
    "List of fruits:\n- apple\n- banana\n-",
    "She opened the door and saw",
    "Water boils at 100 degrees",
    "user: Can you help me write a poem?\nassistant:",
    "The best way to learn a new language is",
)

PERPLEXITY_TEXT = (
    "Language models read text one token at a time and give every token in the vocabulary a score. "
    "The scores become probabilities, and the probability of the text is the product of the probabilities "
    "of its tokens. Perplexity is the exponential of the average negative log-probability per token: a "
    "model that predicts the text well has a low perplexity, and a damaged model has a high one."
)

# Defaults: a float32 vs bfloat16 copy passes comfortably; damaged weights do not. The tail (99.9%) catches a
# conversion broken at a few positions that the mean averages away.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "kl_mean": 0.01,  # nats
    "kl_p99": 0.1,
    "kl_p999": 0.5,
    "top1_agreement": 0.9,  # minimum
    "perplexity_delta": 0.05,  # relative, absolute value
}


@dataclass
class ReferenceOutputs:
    """What the reference said, on CPU: enough to compare any candidate without the reference model."""

    checkpoint: str
    prompts: list[str]
    input_ids: list[list[int]]
    logprobs: list[Any]  # per prompt: (positions, vocab) float32
    greedy: list[list[int]]
    greedy_logprobs: list[list[Any]]  # per prompt, per step: (vocab,)
    perplexity: float
    tokenizer_facts: dict[str, Any]
    corpus_ids: dict[str, list[int]] = field(default_factory=dict)  # the tokenizer corpus, encoded by the reference
    logits: list[Any] = field(default_factory=list)  # per prompt: raw (positions, vocab) float32, for the NMSE
    hidden: list[Any] = field(default_factory=list)  # the first HIDDEN_PROMPTS prompts: (layers + 1, seq, width)
    architecture: str = ""  # the model class: per-layer hidden states compare only within one


HIDDEN_PROMPTS = 4  # prompts whose per-layer hidden states the reference keeps (a few MB even for 8B models)
# A layer's hidden-state NMSE "jumps" when it exceeds 10x the layer before and this floor: rounding to half
# precision grows the error steadily layer by layer; a layer a conversion broke multiplies it.
JUMP_FACTOR = 10.0
JUMP_FLOOR = 1e-3


@dataclass
class DriftReport:
    """Statistics of a candidate against a reference."""

    kl_mean: float
    kl_p95: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    top5_overlap: float
    greedy_agreement: float  # mean fraction of the reference continuation reproduced before the first divergence
    divergences: list[str] = field(default_factory=list)
    perplexity_reference: float = 0.0
    perplexity_candidate: float = 0.0
    worst: str = ""
    kl_sem: float = 0.0  # standard error of the KL mean
    kl_median: float = 0.0
    kl_p999: float = 0.0
    top_probability_rms: float = 0.0  # RMS change of the reference's top token's probability
    logits_nmse: float = 0.0  # sum((candidate - reference)^2) / sum(reference^2) over raw logits
    layer_nmse: list[tuple[str, float]] = field(default_factory=list)  # hidden-state NMSE per layer (same model class)
    jump: str | None = None  # the first layer whose NMSE jumps, with the figures

    @property
    def perplexity_delta(self) -> float:
        return (self.perplexity_candidate - self.perplexity_reference) / self.perplexity_reference

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_candidate / self.perplexity_reference

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        """Rounded figures: stable enough for reports and snapshots."""

        def r(value: float) -> float:
            return float(f"{value:.{digits}g}")

        return {
            "kl_mean": r(self.kl_mean),
            "kl_p95": r(self.kl_p95),
            "kl_p99": r(self.kl_p99),
            "kl_max": r(self.kl_max),
            "kl_sem": r(self.kl_sem),
            "kl_median": r(self.kl_median),
            "kl_p999": r(self.kl_p999),
            "top_probability_rms": r(self.top_probability_rms),
            "logits_nmse": r(self.logits_nmse),
            "perplexity_ratio": r(self.perplexity_ratio),
            "layer_nmse": {name: r(value) for name, value in self.layer_nmse},
            "top1_agreement": r(self.top1_agreement),
            "top5_overlap": r(self.top5_overlap),
            "greedy_agreement": r(self.greedy_agreement),
            "perplexity_reference": r(self.perplexity_reference),
            "perplexity_candidate": r(self.perplexity_candidate),
            "perplexity_delta": r(self.perplexity_delta),
        }

    def __str__(self) -> str:
        d = self.as_dict(3)
        return (
            f"KL mean {d['kl_mean']} ± {d['kl_sem']} median {d['kl_median']} p99 {d['kl_p99']} p99.9 {d['kl_p999']} "
            f"max {d['kl_max']}; top-1 agreement {d['top1_agreement']:.1%}; top-5 overlap {d['top5_overlap']:.1%}; "
            f"RMS Δp of the top token {d['top_probability_rms']}; logits NMSE {d['logits_nmse']}; "
            f"greedy agreement {d['greedy_agreement']:.1%}; perplexity {d['perplexity_reference']} -> "
            f"{d['perplexity_candidate']} (ratio {d['perplexity_ratio']})"
        )

    def layer_table(self) -> str:
        """``embeddings 0; layer 0 1.2e-07; ...``: the hidden-state NMSE after each layer."""
        return "; ".join(f"{name} {value:.3g}" for name, value in self.layer_nmse)


def _tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    return {
        "len": len(tokenizer),
        "special": {
            name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        },
    }


def _perplexity(model: Any, tokenizer: Any) -> float:

    ids = tokenizer(PERPLEXITY_TEXT, return_tensors="pt")["input_ids"].to(model.device)
    return math.exp(float(next_token_nll(model, ids).mean()))


def reference_outputs(
    model: Any, tokenizer: Any, *, prompts: Sequence[str] = REFERENCE_PROMPTS, max_new_tokens: int = 16
) -> ReferenceOutputs:
    """Run the reference once: scores at every prompt position, greedy continuations, perplexity, and the
    per-layer hidden states of the first ``HIDDEN_PROMPTS`` prompts."""
    import torch

    outputs = ReferenceOutputs(
        checkpoint=str(model.name_or_path),
        prompts=list(prompts),
        input_ids=[],
        logprobs=[],
        greedy=[],
        greedy_logprobs=[],
        perplexity=_perplexity(model, tokenizer),
        tokenizer_facts=_tokenizer_facts(tokenizer),
        corpus_ids={text: tokenizer(text)["input_ids"] for text in ROUND_TRIP_CORPUS},
        architecture=type(model).__name__,
    )
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
        generated = greedy_generate(model, tokenizer, ids, max_new_tokens=max_new_tokens)[0]
        full = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype, device=ids.device)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=full).logits[0].float().cpu()
        logprobs = logits.log_softmax(-1)
        outputs.input_ids.append(ids[0].tolist())
        outputs.logprobs.append(logprobs[: ids.shape[1]])
        outputs.logits.append(logits[: ids.shape[1]])
        outputs.greedy.append(generated)
        outputs.greedy_logprobs.append(list(logprobs[ids.shape[1] - 1 : ids.shape[1] - 1 + len(generated)]))
        if index < HIDDEN_PROMPTS:  # the prompt alone, exactly as the candidate's forward sees it
            with torch.no_grad():
                outputs.hidden.append(_hidden_states(model(input_ids=ids, output_hidden_states=True).hidden_states))
    return outputs


def _hidden_states(states: Sequence[Any]) -> Any:
    """``(layers + 1, seq, width)`` float32 on the CPU from a forward's ``hidden_states``: the embeddings' output,
    then every layer's."""
    import torch

    return torch.stack([state[0].float().cpu() for state in states])


def layer_errors(hidden: list[Any], reference: ReferenceOutputs) -> tuple[list[tuple[str, float]], str | None]:
    """Hidden-state NMSE of the candidate's ``hidden`` (per prompt, as the reference keeps them) after the
    embeddings and after each layer, and the first layer whose error jumps (``JUMP_FACTOR`` over the one before,
    above ``JUMP_FLOOR``). Empty for another model class or another layer count: layers do not correspond."""
    if not hidden or len(hidden) != len(reference.hidden):
        return [], None
    squared, total = None, None
    for expected, actual in zip(reference.hidden, hidden, strict=True):
        if actual.shape != expected.shape:
            return [], None
        error, size = ((actual - expected) ** 2).sum((1, 2)), (expected**2).sum((1, 2))
        squared, total = (error, size) if squared is None else (squared + error, total + size)
    nmse = (squared / total.clamp(min=1e-30)).tolist()
    names = ["embeddings", *(f"layer {i}" for i in range(len(nmse) - 1))]
    return list(zip(names, nmse, strict=True)), _first_jump(list(zip(names, nmse, strict=True)))


def _first_jump(errors: list[tuple[str, float]]) -> str | None:
    for (before, previous), (name, value) in itertools.pairwise(errors):
        if value > JUMP_FLOOR and value > JUMP_FACTOR * previous:
            return f"{name}: hidden-state NMSE {value:.3g}, after {previous:.3g} at {before}"
    first_name, first_value = errors[0] if errors else ("", 0.0)
    if first_value > JUMP_FLOOR:
        return f"{first_name}: hidden-state NMSE {first_value:.3g} already (the embedding table differs)"
    return None


def _tokenizer_differences(reference: ReferenceOutputs, tokenizer: Any) -> list[tuple[str, object]]:
    facts = _tokenizer_facts(tokenizer)
    problems: list[tuple[str, object]] = []
    if facts["len"] != reference.tokenizer_facts["len"]:
        problems.append(("vocabulary size", f"reference {reference.tokenizer_facts['len']}, candidate {facts['len']}"))
    for name, value in reference.tokenizer_facts["special"].items():
        if facts["special"].get(name) != value:
            problems.append((name, f"reference {value!r}, candidate {facts['special'].get(name)!r}"))
    # the tokenizer corpus first (code, scripts, emoji, spacing: where converted tokenizers part), then the prompts
    texts = {**reference.corpus_ids, **dict(zip(reference.prompts, reference.input_ids, strict=True))}
    differing = [(text, ids, tokenizer(text)["input_ids"]) for text, ids in texts.items()]
    differing = [(text, ids, theirs) for text, ids, theirs in differing if theirs != ids]
    for text, ids, theirs in differing[:3]:
        first = first_difference(ids, theirs)
        problems.append(
            (
                f"encoding of {text[:30]!r}",
                f"from token {first}: reference {ids[first : first + 8]}, candidate {theirs[first : first + 8]}",
            )
        )
    if differing:
        problems.append(("texts encoded differently", f"{len(differing)} of {len(texts)}"))
    return problems


def compare_to_reference(
    model: Any, tokenizer: Any, reference: ReferenceOutputs, *, tolerance: Tolerance | None = None
) -> DriftReport:
    """Drift statistics of ``model`` against precomputed ``reference`` outputs.

    Raises AssertionError, saying exactly how, when the tokenizers differ: the
    numbers would be meaningless.
    """
    __tracebackhide__ = True
    differences = _tokenizer_differences(reference, tokenizer)
    if differences:
        raise failure(
            f"tokenizer differs from the reference {reference.checkpoint}: statistics would compare different tokens",
            model,
            differences,
        )
    tolerance = resolve_tolerance(model, tolerance)
    positions = _Positions()
    greedy_share, divergences = [], []
    for index in range(len(reference.prompts)):
        ids = positions.add(model, tokenizer, reference, index)
        share, divergence = _greedy_agreement(model, tokenizer, reference, index, ids, tolerance)
        greedy_share.append(share)
        divergences.extend([divergence] if divergence else [])
    layers, jump = layer_errors(positions.hidden, reference)
    return positions.report(
        greedy_agreement=sum(greedy_share) / len(greedy_share),
        divergences=divergences,
        perplexity_reference=reference.perplexity,
        perplexity_candidate=_perplexity(model, tokenizer),
        layer_nmse=layers,
        jump=jump,
    )


@dataclass
class _Positions:
    """Per-position figures over every prompt, gathered as the prompts are scored."""

    kl: list[Any] = field(default_factory=list)
    top1: list[Any] = field(default_factory=list)
    top5: list[Any] = field(default_factory=list)
    top_probability_change: list[Any] = field(default_factory=list)
    squared_error: float = 0.0
    squared_reference: float = 0.0
    worst: tuple[float, str] = (-1.0, "")
    hidden: list[Any] = field(default_factory=list)  # per-layer states of the prompts the reference kept them for

    def add(self, model: Any, tokenizer: Any, reference: ReferenceOutputs, index: int) -> Any:
        """Score prompt ``index`` with ``model`` and fold it in; returns its ids."""
        import torch

        ids = torch.tensor([reference.input_ids[index]], device=model.device)
        keep_hidden = index < len(reference.hidden) and type(model).__name__ == reference.architecture
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=keep_hidden)
        logits = out.logits[0].float().cpu()
        if keep_hidden:
            self.hidden.append(_hidden_states(out.hidden_states))
        candidate, ref = logits.log_softmax(-1), reference.logprobs[index]
        kl = kl_per_position(ref, candidate)
        self.kl.append(kl)
        self.top1.append((ref.argmax(-1) == candidate.argmax(-1)).float())
        ref_top, cand_top = ref.topk(5, -1).indices, candidate.topk(5, -1).indices
        shared = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(ref_top, cand_top, strict=True)]
        self.top5.append(torch.tensor(shared))
        top = ref.argmax(-1, keepdim=True)
        self.top_probability_change.append((candidate.gather(-1, top).exp() - ref.gather(-1, top).exp()).flatten())
        if index < len(reference.logits):
            self.squared_error += float(((logits - reference.logits[index]) ** 2).sum())
            self.squared_reference += float((reference.logits[index] ** 2).sum())
        position = int(kl.argmax())
        if float(kl[position]) > self.worst[0]:
            prompt = reference.prompts[index]
            self.worst = (float(kl[position]), _worst_position(tokenizer, prompt, ids, ref, candidate, kl, position))
        return ids

    def report(self, **rest: Any) -> DriftReport:
        import torch

        kl = torch.cat(self.kl)
        return DriftReport(
            kl_mean=float(kl.mean()),
            kl_sem=float(kl.std() / math.sqrt(kl.numel())) if kl.numel() > 1 else 0.0,
            kl_median=float(kl.median()),
            kl_p95=float(kl.quantile(0.95)),
            kl_p99=float(kl.quantile(0.99)),
            kl_p999=float(kl.quantile(0.999)),
            kl_max=float(kl.max()),
            top1_agreement=float(torch.cat(self.top1).mean()),
            top5_overlap=float(torch.cat(self.top5).mean()),
            top_probability_rms=float(torch.cat(self.top_probability_change).pow(2).mean().sqrt()),
            logits_nmse=self.squared_error / self.squared_reference if self.squared_reference else 0.0,
            worst=self.worst[1],
            **rest,
        )


def _worst_position(tokenizer: Any, prompt: str, ids: Any, ref: Any, candidate: Any, kl: Any, position: int) -> str:
    r_tok, c_tok = int(ref[position].argmax()), int(candidate[position].argmax())
    return (
        f"prompt {prompt!r}, position {position} after {text_of(tokenizer, ids[0, : position + 1])}: KL "
        f"{float(kl[position]):.4g}; reference top {token(tokenizer, r_tok)} p={float(ref[position, r_tok].exp()):.3f}, "
        f"candidate top {token(tokenizer, c_tok)} p={float(candidate[position, c_tok].exp()):.3f}"
    )


def _greedy_agreement(
    model: Any, tokenizer: Any, reference: ReferenceOutputs, index: int, ids: Any, tolerance: Tolerance
) -> tuple[float, str | None]:
    """The share of the reference's greedy continuation reproduced before the first divergence, and that divergence."""
    expected = reference.greedy[index]
    generated = greedy_generate(model, tokenizer, ids, max_new_tokens=len(expected) or 1)[0]
    shared = min(len(expected), len(generated))  # an earlier eos is not a divergence of the tokens both have
    step = first_difference(expected[:shared], generated[:shared])
    if step is None:
        return 1.0, None
    scores = reference.greedy_logprobs[index][step]
    margin = float(scores[expected[step]] - scores[generated[step]])
    kind = "near-tie" if abs(margin) <= tolerance.bound(float(scores[expected[step]])) else f"margin {margin:.3g}"
    return step / max(len(expected), 1), (
        f"{reference.prompts[index]!r}: step {step}, reference {token(tokenizer, expected[step])}, "
        f"candidate {token(tokenizer, generated[step])} ({kind})"
    )


def _no_jump(report: DriftReport) -> str:
    if not report.layer_nmse:
        return "not compared: the candidate is another model class or has another layer count than the reference"
    return f"none: the error grows by less than {JUMP_FACTOR:g}x a layer ({report.layer_table()})"


def assert_close_to_reference(
    model: Any,
    tokenizer: Any,
    reference: ReferenceOutputs,
    *,
    thresholds: dict[str, float] | None = None,
    tolerance: Tolerance | None = None,
) -> DriftReport:
    """Fail when a drift statistic exceeds its threshold; the message names each one and the worst position."""
    __tracebackhide__ = True
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    report = compare_to_reference(model, tokenizer, reference, tolerance=tolerance)
    exceeded = []
    if report.kl_mean > limits["kl_mean"]:
        exceeded.append(("KL mean", f"{report.kl_mean:.4g} > threshold {limits['kl_mean']:g}"))
    if report.kl_p99 > limits["kl_p99"]:
        exceeded.append(("KL p99", f"{report.kl_p99:.4g} > threshold {limits['kl_p99']:g}"))
    if report.kl_p999 > limits["kl_p999"]:
        exceeded.append(("KL p99.9", f"{report.kl_p999:.4g} > threshold {limits['kl_p999']:g}"))
    if report.top1_agreement < limits["top1_agreement"]:
        exceeded.append(("top-1 agreement", f"{report.top1_agreement:.1%} < threshold {limits['top1_agreement']:.0%}"))
    if abs(report.perplexity_delta) > limits["perplexity_delta"]:
        exceeded.append(
            (
                "perplexity delta",
                f"{report.perplexity_delta:+.2%} (|delta| > threshold {limits['perplexity_delta']:.0%})",
            )
        )
    if exceeded:
        raise failure(
            f"drift from the reference {reference.checkpoint} exceeds {len(exceeded)} threshold(s)",
            model,
            figure=("KL mean", report.kl_mean),
            layer_nmse=report.layer_nmse,
            details=[
                *exceeded,
                ("statistics", str(report)),
                ("worst position", report.worst),
                ("first layer whose error jumps", report.jump or _no_jump(report)),
                ("first greedy divergences", "; ".join(report.divergences[:3]) or "none"),
                *([("hidden-state NMSE per layer", report.layer_table())] if report.layer_nmse else []),
            ],
        )
    return report
