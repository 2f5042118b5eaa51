"""Long context: KV-cache parity and prefix causality on a sequence that crosses every boundary the config
declares (sliding windows, attention chunks, the original context of a RoPE scaling).

Long prefill: the same two comparisons on one long prompt (1024+ tokens where the context allows), whatever
the config declares. RAG prompts and documents arrive as one prefill of thousands of tokens, and kernels switch
to tiled or chunked paths past a length that no short prompt reaches; a server feeds the same prompt in chunks.

Bugs live at those boundaries: a sliding-window mask off by one, a cache that evicts a token too many, a RoPE
scaling that switches per call once a sequence passes the original context. The length comes from the config,
capped by ``max_position_embeddings`` and a token budget; the scores compared are those around each boundary
and a sample of the rest, so a 1B model stays within seconds on a GPU.

Far positions: what the checkpoint promises up to ``max_position_embeddings``, checked without a long input.

Positions past the first few dozen are rarely looked at: the long-context invariant needs a declared boundary.
For a position encoding that depends only on distance (RoPE without length-dependent scaling, ALiBi), the same
short window of tokens placed at far offsets (``position_ids`` shifted) must score as it does at the start; a
rotary table built for a shorter context, positions clamped or wrapped, or angles computed in half precision
break that. Learned absolute position embeddings are not shift-invariant by design: their far rows must exist
and give finite scores.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import random
from dataclasses import dataclass
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    DEFAULT_TEXTS,
    CheckResult,
    cache_kind,
    cache_kwargs,
    check_scores,
    failure,
    kl_per_position,
    mismatch_failure,
    natural_ids,
    resolve_tolerance,
    returned_cache,
    state_rounding_tolerance,
    text_of,
    token,
)
from ._localise import Replay, Side

__all__ = [
    "MAX_SHIFT_KL",
    "Boundary",
    "assert_far_positions_consistent",
    "assert_long_context_consistent",
    "assert_long_prefill_consistent",
    "context_boundaries",
    "default_context_budget",
    "default_prefill_tokens",
    "position_encoding",
    "promised_length",
]


# RoPE types whose frequencies depend on the length of the call: a cached prefix and a longer forward differ.
_PER_CALL_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Boundary:
    """A position where the model's attention or positions change behaviour, and the length that crosses it."""

    name: str
    position: int
    crossing_length: int


def default_context_budget(device: Any) -> int:
    """The longest sequence the check builds by default: 4096 tokens on CPU, 32768 on an accelerator."""
    return 4096 if str(device).startswith("cpu") else 32768


def _sliding_window(text: Any) -> int | None:
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None  # a window is configured but no layer uses it (Qwen2's use_sliding_window=False)
    if getattr(text, "use_sliding_window", True) is False:
        return None
    window = getattr(text, "sliding_window", None)
    if not window and "local" in str(getattr(text, "attention_layers", "")):
        window = getattr(text, "window_size", None)  # GPT-Neo's local layers
    return int(window) if isinstance(window, int) and window > 0 else None


def _rope_parameter_sets(text: Any) -> list[dict[str, Any]]:
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    if "rope_type" in rope or "type" in rope:
        return [rope]
    return [value for value in rope.values() if isinstance(value, dict)]  # one set per layer type


def context_boundaries(config: Any) -> list[Boundary]:
    """Every context boundary ``config`` declares, in order of position."""
    text = config.get_text_config()
    found = []
    window = _sliding_window(text)
    if window:
        found.append(Boundary(f"sliding window {window}", window, 2 * window + 8))
    chunk = getattr(text, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk > 0:
        found.append(Boundary(f"attention chunk {chunk}", chunk, 2 * chunk + 8))
    for rope in _rope_parameter_sets(text):
        kind = rope.get("rope_type", rope.get("type", "default"))
        original = rope.get("original_max_position_embeddings")
        if kind == "dynamic":  # dynamic NTK scales from max_position_embeddings on, by design past it
            original = original or getattr(text, "max_position_embeddings", None)
        if isinstance(original, int) and original > 0 and kind != "default":
            name = f"RoPE {kind} original context {original}"
            if all(b.name != name for b in found):
                found.append(Boundary(name, original, original + max(16, original // 16)))
    return sorted(found, key=lambda b: b.position)


def _length_cap(config: Any, budget: int) -> int:
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    dynamic = any(r.get("rope_type", r.get("type")) == "dynamic" for r in _rope_parameter_sets(text))
    return budget if dynamic or not isinstance(limit, int) else min(limit, budget)


def _compared_positions(boundaries: list[Boundary], length: int) -> list[int]:
    """Around each boundary, plus a sample of the rest and the last position."""
    positions = {length - 1, *range(0, length, max(1, length // 32))}
    for boundary in boundaries:
        positions.update(range(max(0, boundary.position - 2), min(length, boundary.position + 3)))
    return sorted(positions)


def _segments(boundaries: list[Boundary], length: int) -> list[tuple[int, int]]:
    """How the cached pass feeds the sequence: at each boundary a 4-token chunk whose edge lies across it,
    then three single-token steps past it; long chunks in between (longer than a window, where one is)."""
    edges: list[tuple[int, int]] = []
    cursor = 0
    for boundary in boundaries:
        b = boundary.position
        if b - 3 <= cursor:
            continue
        edges += [(cursor, b - 3), (b - 3, b + 1), (b + 1, b + 2), (b + 2, b + 3), (b + 3, b + 4)]
        cursor = b + 4
    edges.append((cursor, length))
    return [(start, stop) for start, stop in edges if start < stop <= length]


def _scores_at(model: Any, ids: Any, rows: list[int], **kwargs: Any) -> tuple[Any, Any]:
    """``(scores of ``rows`` of this forward, output)``: ``logits_to_keep`` keeps only those rows where the
    forward supports index tensors; otherwise the full logits are sliced."""
    import torch

    index = torch.tensor(rows, device=ids.device)
    with torch.no_grad():
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            try:
                out = model(input_ids=ids, logits_to_keep=index, **kwargs)
            except (TypeError, RuntimeError, IndexError):  # a forward that takes only an int count
                out = None
            if out is not None and out.logits.shape[1] == len(rows):
                return out.logits[0].float(), out
        out = model(input_ids=ids, **kwargs)
    return out.logits[0, index].float(), out


def _likely_cause(boundaries: list[Boundary]) -> str | None:
    switching = [b for b in boundaries if any(f"RoPE {kind} " in b.name for kind in _PER_CALL_ROPE)]
    if switching:
        return (
            f"{switching[0].name}: this RoPE type picks its frequencies from each call's length, so keys cached "
            "by a shorter call and a longer forward use different ones"
        )
    return None


def _absolute(mismatch: Any, positions: list[int]) -> Any:
    """A mismatch over the compared rows, with its positions mapped back to the sequence."""
    return dataclasses.replace(
        mismatch, first_position=positions[mismatch.first_position], worst_position=positions[mismatch.worst_position]
    )


def assert_long_context_consistent(
    model: Any, tokenizer: Any, *, budget: int | None = None, tolerance: Tolerance | None = None
) -> CheckResult:
    """KV-cache parity and prefix causality on a sequence crossing every declared context boundary.

    The cached pass feeds long chunks, a chunk straddling each boundary and single steps past it; prefixes
    ending just before and just after each boundary are scored alone. Both must give the full forward's
    scores at the compared positions. ``budget`` caps the length (default: ``default_context_budget``).
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    declared = context_boundaries(model.config)
    if not declared:
        pytest.skip(
            "the config declares no context boundary (sliding window, attention chunk, RoPE scaling's original context)"
        )
    cap = _length_cap(model.config, budget or default_context_budget(model.device))
    reached = [b for b in declared if b.position + 4 <= cap]
    if not reached:
        pytest.skip(
            f"{declared[0].name} needs {declared[0].position + 4}+ tokens, beyond the cap of {cap} "
            "(max_position_embeddings, or the budget: raise --causal-lm-long-context-tokens)"
        )
    length = min(cap, max(b.crossing_length for b in reached))
    ids = natural_ids(tokenizer, length, model.device)
    kind = cache_kind(model, ids)
    if kind != "kv":
        held = "a recurrent/state-space cache (cache_params)" if kind == "recurrent" else "no past_key_values"
        pytest.skip(f"{type(model).__name__} returns {held}; the long-context check feeds a key/value cache")
    positions = _compared_positions(reached, length)
    full, _ = _scores_at(model, ids, positions)
    result = CheckResult("long context", tolerance=tolerance)
    result.note(f"{length} tokens across {', '.join(b.name for b in reached)}; {len(positions)} positions compared")
    run = _LongRun("long context", model, tokenizer, ids, full, positions, reached, result)
    _check_cached_pass(run, _segments(reached, length))
    ends = [(end, f"around {b.name}") for b in reached for end in (b.position - 1, b.position + 2)]
    _check_prefixes(run, ends)
    for boundary in declared[len(reached) :]:
        result.note(f"{boundary.name} not reached: the cap is {cap} tokens")
    return result


@dataclass
class _LongRun:
    """One long sequence, its full-forward scores at the compared positions, and where failures go."""

    check: str  # the invariant's name, which opens a failure's title
    model: Any
    tokenizer: Any
    ids: Any
    full: Any  # scores of the full forward at ``positions``
    positions: list[int]
    boundaries: list[Boundary]
    result: CheckResult

    def compare(self, rows: list[int], scores: Any, title: Any, how: str, side: Side, cause: str | None = None) -> None:
        """``scores`` of sequence positions ``rows`` against the full forward's; ``title(mismatch)`` names a failure
        and ``side`` replays how ``scores`` were computed, to name the first module that departs."""
        __tracebackhide__ = True
        expected = self.full[[self.positions.index(p) for p in rows]]
        mismatch = check_scores(self.result, expected, scores, self.result.tolerance)
        if not mismatch:
            return
        mismatch = _absolute(mismatch, rows)
        cause = _likely_cause(self.boundaries) or cause
        replay = Replay(Side("the full forward", lambda: self.model(input_ids=self.ids)), side, tuple(rows))
        boundaries = ", ".join(f"{b.name} (position {b.position})" for b in self.boundaries)
        raise mismatch_failure(
            f"{self.check}: {title(mismatch)}",
            self.model,
            self.tokenizer,
            [
                ("sequence", f"{self.ids.shape[1]} tokens of repeated natural text"),
                *([("boundaries", boundaries)] if boundaries else []),
                ("how", how),
                *([("likely cause", cause)] if cause else []),
            ],
            mismatch,
            self.result.tolerance,
            replay=replay,
        )


def _cached_segments(run: _LongRun, segments: list[tuple[int, int]]) -> Any:
    """The cached pass over ``segments``, replayable."""

    def feed() -> None:
        cache = None
        for start, stop in segments:
            piece = run.ids[:, start:stop]
            cache = returned_cache(run.model(input_ids=piece, use_cache=True, **cache_kwargs(run.model, cache)))

    return feed


_UNCACHED_FIRST_SEGMENT = (
    "the first segment is a forward of its own, with no cache yet: the full forward departs from a shorter call "
    "over the same tokens (a kernel, mask or position table that switches with the call's length)"
)


def _check_cached_pass(run: _LongRun, segments: list[tuple[int, int]]) -> None:
    """Feed the sequence through the cache in ``segments``; the compared rows of each equal the full forward's."""
    __tracebackhide__ = True
    how = "prefill and decode with past_key_values: " + ", ".join(f"{a}..{b - 1}" for a, b in segments)
    cache = None
    for number, (start, stop) in enumerate(segments, 1):
        rows = [p for p in run.positions if start <= p < stop]
        kept = [p - start for p in rows] or [stop - start - 1]  # a segment between sampled rows still feeds the cache
        scores, out = _scores_at(
            run.model, run.ids[:, start:stop], kept, **cache_kwargs(run.model, cache), use_cache=True
        )
        cache = returned_cache(out)
        if rows:
            run.compare(
                rows,
                scores,
                lambda m, number=number, start=start, stop=stop: (
                    f"cached pass, segment {number} of {len(segments)} (positions {start}..{stop - 1}) differs from "
                    f"the full forward from position {m.first_position} "
                    f"(token {token(run.tokenizer, int(run.ids[0, m.first_position]))})"
                ),
                how,
                Side(f"cached segment {number}", _cached_segments(run, segments[:number]), number - 1, offset=start),
                None if number > 1 else _UNCACHED_FIRST_SEGMENT,
            )


def _check_prefixes(run: _LongRun, ends: list[tuple[int, str]]) -> None:
    """Each prefix ``(end, where)`` alone scores its compared positions as the full forward (causality)."""
    __tracebackhide__ = True
    length = run.ids.shape[1]
    for end, where in ends:
        rows = [p for p in run.positions if p < end]
        if not rows or end >= length:
            continue
        scores, _ = _scores_at(run.model, run.ids[:, :end], rows, use_cache=False)
        run.compare(
            rows,
            scores,
            lambda m, end=end: (
                f"prefix causality: the first {end} tokens alone score position {m.first_position} "
                f"unlike the full {length}-token forward"
            ),
            f"forward of the prefix ending before position {end}, {where}",
            Side(f"the first {end} tokens alone", lambda end=end: run.model(input_ids=run.ids[:, :end])),
        )


# The long prefill's length. It costs about three forwards of the whole prompt (the one-shot forward, the
# chunked pass, the prefixes): on CPU the default runs it for models up to 10M parameters (under a second on
# 2 cores); larger ones opt in (SmolLM2-135M: 7.6-9.4 s at 1024 tokens). Attention memory grows with the
# square of the length (heads x tokens^2 scores per layer under eager attention).
PREFILL_TOKENS = 1024
ACCELERATOR_PREFILL_TOKENS = 4096
CPU_PREFILL_PARAMETERS = 10_000_000
_SHORTEST_PREFILL = 256
_SAMPLED_POSITIONS = 24
_SAMPLED_PREFIXES = 3
_SINGLE_STEPS = 3


def default_prefill_tokens(model: Any) -> tuple[int, str | None]:
    """The long prefill's default length, and why it is off (length 0) when it is."""
    if not str(model.device).startswith("cpu"):
        return ACCELERATOR_PREFILL_TOKENS, None
    parameters = sum(p.numel() for p in model.parameters())
    if parameters <= CPU_PREFILL_PARAMETERS:
        return PREFILL_TOKENS, None
    return 0, (
        f"off by default on CPU for models over {CPU_PREFILL_PARAMETERS // 1_000_000}M parameters "
        f"({parameters / 1e6:.0f}M here; about 8 s for 135M at {PREFILL_TOKENS} tokens on 2 cores): "
        f"--causal-lm-long-prefill-tokens={PREFILL_TOKENS} turns it on"
    )


def promised_length(model: Any, wanted: int) -> tuple[int, str | None]:
    """``wanted``, capped where one forward and chunks are promised to agree: ``max_position_embeddings``, a
    learned position table's rows past its offset (RoBERTa's start at padding_idx + 1), and a RoPE type that
    picks its frequencies by each call's length (the long-context invariant checks that switch)."""
    text = model.config.get_text_config()
    caps = [(wanted, None)]
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        caps.append((limit, f"max_position_embeddings {limit}"))
    table = _absolute_table(model)
    if table is not None:
        name, module = table
        offset = 0 if module.padding_idx is None else module.padding_idx + 1
        caps.append((module.num_embeddings - offset, f"{name}'s {module.num_embeddings} rows from row {offset}"))
    for boundary in context_boundaries(model.config):
        if any(f"RoPE {kind} " in boundary.name for kind in _PER_CALL_ROPE):
            caps.append((boundary.position, boundary.name))
    return min(caps, key=lambda cap: cap[0])


def _prefill_segments(length: int) -> list[tuple[int, int]]:
    """A server's chunked prefill: chunks of a quarter plus one (so no chunk edge falls on a power-of-two tile),
    then the last tokens one at a time, as decoding steps."""
    size = length // 4 + 1
    edges = [*range(0, length - _SINGLE_STEPS, size), *range(length - _SINGLE_STEPS, length + 1)]
    return list(itertools.pairwise(edges))


def _prefill_positions(length: int, segments: list[tuple[int, int]], ends: list[int], rng: random.Random) -> list[int]:
    """A seeded sample of positions, both sides of every chunk edge, the first and last, and each prefix's end."""
    edges = {p for start, _ in segments[1:] for p in (start - 1, start)}
    sample = rng.sample(range(length), _SAMPLED_POSITIONS)
    return sorted({0, length - 1, *edges, *sample, *(end - 1 for end in ends)})


def assert_long_prefill_consistent(
    model: Any, tokenizer: Any, *, tokens: int | None = None, seed: int = 0, tolerance: Tolerance | None = None
) -> CheckResult:
    """One forward of a long prompt scores as the same prompt fed through the cache in chunks, and as its
    prefixes ending at seeded random positions (causality), at a seeded sample of positions and every chunk edge.

    ``tokens``: the prompt's length, capped by ``max_position_embeddings`` (0: off; default
    ``default_prefill_tokens``). Models without a key/value cache get the prefixes only, and the verdict says so.
    """
    __tracebackhide__ = True
    tolerance = resolve_tolerance(model, tolerance)
    wanted, off = (tokens, "--causal-lm-long-prefill-tokens=0") if tokens is not None else default_prefill_tokens(model)
    if not wanted:
        pytest.skip(f"long prefill: {off}")
    length, capped_by = promised_length(model, wanted)
    if length < _SHORTEST_PREFILL:
        pytest.skip(f"long prefill: {capped_by} leaves no long prompt ({_SHORTEST_PREFILL}+ tokens)")
    rng = random.Random(seed)
    ends = sorted(rng.randrange(length * k // 3 + 2, length * (k + 1) // 3) for k in range(_SAMPLED_PREFIXES))
    segments = _prefill_segments(length)
    positions = _prefill_positions(length, segments, ends, rng)
    ids = natural_ids(tokenizer, length, model.device)
    full, _ = _scores_at(model, ids, positions)
    tolerance, widened = state_rounding_tolerance(model, tolerance)
    result = CheckResult("long prefill", tolerance=tolerance)
    result.note(
        f"{length} tokens in one forward{f' (capped by {capped_by})' if capped_by else ''}; prefixes of {ends} "
        f"tokens; {len(positions)} positions compared{f'; {widened}' if widened else ''}"
    )
    run = _LongRun("long prefill", model, tokenizer, ids, full, positions, [], result)
    _prefill_cached_pass(run, segments)
    _check_prefixes(run, [(end, "a seeded random length") for end in ends])
    return result


def _prefill_cached_pass(run: _LongRun, segments: list[tuple[int, int]]) -> None:
    """The chunked pass where the model keeps a key/value cache; otherwise the verdict says why not."""
    __tracebackhide__ = True
    kind = cache_kind(run.model, run.ids)
    if kind != "kv":
        held = "a recurrent/state-space cache (cache_params)" if kind == "recurrent" else "no past_key_values"
        run.result.note(f"chunked pass not compared: {type(run.model).__name__} returns {held}")
        return
    _check_cached_pass(run, segments)
    sizes = sorted({stop - start for start, stop in segments}, reverse=True)
    run.result.note(f"chunked pass: chunks of {sizes[0]} tokens, then {_SINGLE_STEPS} single steps")


# Per-position KL divergence (nats) a shifted window may show. Measured at the far end of the context, per
# position at most: SmolLM2-135M 3e-7 in float32, 0.03 in bfloat16, 3e-4 in float16; a rotary table clamped
# at 64 positions gives 0.9-2.8 on tiny checkpoints and 4.0 on SmolLM2.
MAX_SHIFT_KL = 0.25
WINDOW = 16
_ABSOLUTE_TABLES = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def position_encoding(model: Any) -> tuple[str | None, str]:
    """``("relative", what)``, ``("absolute", what)`` or ``(None, why not)``, from the config (and, for learned
    tables, the embedding module the config sizes)."""
    text = model.config.get_text_config()
    table = _absolute_table(model)
    if table is not None:
        return "absolute", f"learned position embeddings ({table[0]})"
    kinds = {r.get("rope_type", r.get("type", "default")) for r in _rope_parameter_sets(text)}
    per_call = sorted(kinds & set(_PER_CALL_ROPE))
    if per_call:
        return None, f"RoPE {per_call[0]} scales its frequencies with each call's length, so a shift is not neutral"
    if _alibi(model.config, text):
        return "relative", "ALiBi"
    if kinds or getattr(text, "rope_theta", None) is not None:
        return "relative", f"RoPE ({', '.join(sorted(kinds)) or 'default'})"
    return None, "the config declares neither RoPE, ALiBi nor learned position embeddings"


def _alibi(config: Any, text: Any) -> bool:
    attention = getattr(text, "attn_config", None)
    in_attention = attention.get("alibi") if isinstance(attention, dict) else getattr(attention, "alibi", False)
    return bool(getattr(text, "alibi", False) or in_attention or config.model_type == "bloom")


def _absolute_table(model: Any) -> tuple[str, Any] | None:
    import torch

    for name, module in model.named_modules():
        if name.split(".")[-1] in _ABSOLUTE_TABLES and isinstance(module, torch.nn.Embedding):
            return name, module
    return None


def _offsets(model: Any, length: int) -> list[int]:
    """A quarter, a half and the end of the declared context; aligned to attention chunks, which do depend on
    absolute positions (a window must not straddle a chunk edge at one offset and not at the other)."""
    text = model.config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:  # XLNet's -1: "no sequence length limit"
        pytest.skip("far positions: the config declares no max_position_embeddings, so no far position is promised")
    if limit < 4 * length:
        pytest.skip(f"far positions: max_position_embeddings {limit} is too short to shift a window in")
    chunk = getattr(text, "attention_chunk_size", None)
    align = chunk if isinstance(chunk, int) and chunk > length else 1
    picks = {limit // 4, limit // 2, limit - length}
    return sorted({max(align, offset // align * align) for offset in picks})


def assert_far_positions_consistent(model: Any, tokenizer: Any, *, text: str = DEFAULT_TEXTS[2]) -> CheckResult:
    """A window of ``text`` scores alike at the start and at far offsets up to ``max_position_embeddings``
    (per-position KL <= MAX_SHIFT_KL) for relative encodings; for learned absolute ones the far rows exist and
    give finite scores. Skips where the config declares no position encoding to judge."""
    __tracebackhide__ = True
    kind, what = position_encoding(model)
    if kind is None:
        pytest.skip(f"far positions: {what}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :WINDOW].to(model.device)
    offsets = _offsets(model, ids.shape[1])
    result = CheckResult("far positions")
    start = _scores(model, ids, 0)
    for offset in offsets:
        far = _scores(model, ids, offset)
        if kind == "absolute":
            _check_finite(model, tokenizer, ids, far, offset)
            continue
        kl = kl_per_position(start, far)
        result.figure = ("KL max", max(float(kl.max()), result.figure[1] if result.figure else 0.0))
        if float(kl.max()) > MAX_SHIFT_KL:
            _shift_failure(model, tokenizer, ids, start, far, kl, offset, what)
    result.note(f"{what}: a {ids.shape[1]}-token window at offsets {offsets} of {_limit(model)} positions")
    return result


def _limit(model: Any) -> int:
    return model.config.get_text_config().max_position_embeddings


def _scores(model: Any, ids: Any, offset: int) -> Any:
    import torch

    positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)[None]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()


def _shift_failure(model: Any, tokenizer: Any, ids: Any, start: Any, far: Any, kl: Any, offset: int, what: str) -> None:
    __tracebackhide__ = True
    position = int(kl.argmax())
    raise failure(
        f"far positions: the same tokens at offset {offset} score unlike at the start ({what} depends on distance "
        "only)",
        model,
        [
            ("window", text_of(tokenizer, ids[0])),
            ("worst position", f"{position} of the window, after {text_of(tokenizer, ids[0, : position + 1])}"),
            ("KL", f"{float(kl[position]):.3g} nats > {MAX_SHIFT_KL} (mean over the window {float(kl.mean()):.3g})"),
            ("top-1 at start", token(tokenizer, int(start[position].argmax()))),
            (f"top-1 at {offset}", token(tokenizer, int(far[position].argmax()))),
            (
                "likely cause",
                "a rotary table built for a shorter context (positions clamped or wrapped), or rotary "
                "angles computed in the run dtype instead of float32",
            ),
        ],
        figure=("KL max", float(kl.max())),
    )


def _check_finite(model: Any, tokenizer: Any, ids: Any, far: Any, offset: int) -> None:
    __tracebackhide__ = True
    import torch

    bad = ~torch.isfinite(far).all(-1)
    if not bool(bad.any()):
        return
    position = int(bad.nonzero()[0])
    name, table = _absolute_table(model)
    rows = table.weight[offset : offset + ids.shape[1]]
    raise failure(
        f"far positions: non-finite scores at position {offset + position} (learned position embeddings)",
        model,
        [
            ("window", text_of(tokenizer, ids[0])),
            (
                "table",
                f"{name}: {table.weight.shape[0]} rows, {int((~torch.isfinite(rows)).any(-1).sum())} "
                f"non-finite among rows {offset}..{offset + ids.shape[1] - 1}",
            ),
        ],
        figure=("position", float(offset + position)),
    )
