"""What every check shares: model context, token formatting, tolerant score comparison."""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tolerances import Tolerance, tolerance_for
from ._localise import Replay, localisation_rows, within

DEFAULT_TEXTS: tuple[str, ...] = (
    "Hi dog how are you?",
    "Text generation is sequence classification in a for-loop.",
    "The quick brown fox jumps over the lazy dog.",
)


def context(model: Any) -> str:
    """``checkpoint X (device cpu, dtype float32)``: the first line of every failure's details."""
    name = getattr(model, "name_or_path", "") or type(model).__name__
    dtype = str(getattr(model, "dtype", "?")).removeprefix("torch.")
    return f"{name} (device {getattr(model, 'device', '?')}, dtype {dtype})"


def resolve_tolerance(model: Any, tolerance: Tolerance | None) -> Tolerance:
    return tolerance if tolerance is not None else tolerance_for(getattr(model, "dtype", "float32"))


def token(tokenizer: Any, token_id: int) -> str:
    """``' dog' (id 5)``: a token decoded, with its id."""
    try:
        text = tokenizer.decode([int(token_id)])
    except Exception:  # ids beyond the tokenizer's vocabulary cannot be decoded
        text = "<undecodable>"
    return f"{text!r} (id {int(token_id)})"


def text_of(tokenizer: Any, ids: Sequence[int] | Any) -> str:
    """The decoded text of ``ids``, shortened from the left to stay readable."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    text = repr(tokenizer.decode(ids))
    return text if len(text) <= 100 else "'..." + text[-96:]


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Where two sequences (ids, text) first differ: the first unequal index, or the shorter one's length when it
    is a prefix of the other; None when they are equal."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def until_eos(row: Sequence[int], stop: set[int]) -> list[int]:
    """``row`` of generated ids up to and including its first stop id (generate pads finished rows after it)."""
    return list(row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))])


def kl_per_position(expected: Any, actual: Any) -> Any:
    """KL(expected || actual) in nats at each position of two ``(..., vocab)`` score tensors (raw scores or
    log-probabilities: both are normalised here), in float32."""
    import torch.nn.functional as F

    log_p, log_q = expected.float().log_softmax(-1), actual.float().log_softmax(-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).clamp(min=0)


def next_token_nll(model: Any, ids: Any) -> Any:
    """Negative log-likelihood (nats) of each next token of ``ids`` ``(1, seq)`` under ``model``: ``(seq - 1,)``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        scores = model(input_ids=ids).logits[0, :-1].float()
    return F.cross_entropy(scores, ids[0, 1:].to(scores.device), reduction="none")


# How transformers words its refusal of a path for a model (generate's validation, attention switching).
_REFUSAL = re.compile(
    r"not supported|does not support|doesn't support|only supports?|requires|not implemented|not compatible"
    r"|doesn't have its forwarding implemented|is not available|not installed|install|cannot use"
)
# Where those refusals are raised: generate's own validation and the model-loading machinery; never a model's
# forward, a cache or custom code (there a "not supported" is a bug reached at run time, e.g. a crop called with
# the wrong sign).
_REFUSING_MODULES = ("generation", "modeling_utils.py", "integrations", "utils/import_utils.py")
# transformers' hooks that a model overrides to refuse a setting (hrm_text: no flash attention with a prefix-LM mask)
_REFUSING_HOOKS = ("_check_and_adjust_attn_implementation",)


def transformers_refusal(exc: BaseException) -> str | None:
    """transformers' own words when it refuses a path for this model (the innermost frame is in its generation or
    loading machinery and the message reads as a refusal), or None: then the exception is a failure."""
    import transformers

    frames = _frames(exc)
    if not frames:
        return None
    package = Path(transformers.__file__).resolve().parent
    raised_in = Path(frames[-1].f_code.co_filename).resolve()
    where = str(raised_in.relative_to(package)) if package in raised_in.parents else None
    inside = where is not None and (
        where.startswith(_REFUSING_MODULES)
        or raised_in.name.startswith("configuration_")  # a model's config validating a setting
        or frames[-1].f_code.co_name in _REFUSING_HOOKS
    )
    words = first_line(exc)
    return words if inside and _REFUSAL.search(words) else None


def first_line(exc: BaseException) -> str:
    """``ValueError: the first line of the message`` (at most 300 characters)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _frames(exc: BaseException) -> list[Any]:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def raised_where(exc: BaseException, model: Any) -> tuple[str | None, str]:
    """``(module, place)``: the innermost module of ``model`` whose forward was running when ``exc`` was raised
    (its qualified name and class), and the file and line that raised it."""
    import torch

    names = {id(module): name for name, module in model.named_modules()} if hasattr(model, "named_modules") else {}
    module = None
    frames = _frames(exc)
    for frame in frames:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, torch.nn.Module) and id(candidate) in names:
            module = candidate
    named = None if module is None else f"{names[id(module)] or '(the model itself)'} ({type(module).__name__})"
    place = f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno} in {frames[-1].f_code.co_name}" if frames else "?"
    return named, place


def error_failure(
    exc: BaseException,
    model: Any,
    doing: str,
    *,
    title: str | None = None,
    why: tuple[str, str] = ("not a skip", "transformers did not refuse this path; the code that runs it raised"),
) -> AssertionError:
    """An exception a check did not expect, as a failure that names it, the module it came from and where it was
    raised: an error on a path users take is a bug of that path, not a reason to skip it."""
    module, place = raised_where(exc, model)
    return failure(
        title or f"{doing} raised {first_line(exc)}",
        model,
        [("error", first_line(exc)), *([("in module", module)] if module else []), ("raised at", place), why],
    )


def measured_of(exc: BaseException) -> dict[str, Any] | None:
    """What a failed check measured (figure, position, token, tolerance), or None for other exceptions."""
    return getattr(exc, "causal_lm_measured", None)


def failure(
    title: str,
    model: Any,
    details: Sequence[tuple[str, object]],
    *,
    mismatch: ScoreMismatch | None = None,
    tolerance: Tolerance | None = None,
    figure: tuple[str, float] | None = None,
    layer_nmse: Sequence[tuple[str, float]] = (),
) -> AssertionError:
    """An AssertionError whose message is a title and aligned ``label: value`` lines.

    ``mismatch`` and ``tolerance`` (or ``figure``, ``layer_nmse``) travel with it as data (``measured_of``), so
    reports never parse the text. It stays a plain AssertionError so pytest shows it as one.
    """
    rows = [("checkpoint", context(model)), *details]
    width = max(len(label) for label, _ in rows)
    body = "\n".join(f"  {label.ljust(width)} : {value}" for label, value in rows)
    measured: dict[str, Any] = {"title": title}
    if mismatch is not None:
        measured.update(
            figure=("Δ", mismatch.greatest_difference),
            position=mismatch.worst_position,
            token_id=mismatch.worst_token_id,
            mismatched=mismatch.mismatched,
        )
    if figure is not None:
        measured["figure"] = figure
    if tolerance is not None:
        measured["tolerance"] = tolerance.as_dict()
    if layer_nmse:
        measured["layer_nmse"] = [[name, value] for name, value in layer_nmse]
    error = AssertionError(f"{title}\n{body}")
    error.causal_lm_measured = measured  # type: ignore[attr-defined]
    return error


def mismatch_failure(
    title: str,
    model: Any,
    tokenizer: Any,
    details: Sequence[tuple[str, object]],
    mismatch: ScoreMismatch,
    tolerance: Tolerance,
    *,
    position_label: str = "position",
    replay: Replay | Callable[[], list[tuple[str, object]]] | None = None,
) -> AssertionError:
    """A score-comparison failure: ``details``, then where, which token and by how much (also as data); with
    ``replay`` (the two sides, or what locates them: another process's), the first module whose output departs
    follows right after the greatest difference."""
    described = mismatch.describe(tokenizer, tolerance, position_label=position_label)
    if isinstance(replay, Replay):
        located = localisation_rows(model, replay, within(tolerance))
    else:
        located = replay() if replay is not None else []
    rows = [*details, *described[:2], *located, *described[2:]]
    return failure(title, model, rows, mismatch=mismatch, tolerance=tolerance)


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``forward`` or ``generate``: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name warns); earlier versions and custom code that kept it take the old one."""
    declared = inspect.signature(type(model).forward).parameters  # the class's: an instance may wrap forward
    return {"cache" if "cache" in declared else "past_key_values": cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward or ``generate`` returned, under any version's name (``cache`` from 5.24)."""
    entry = _cache_entry(output)
    return entry[1] if entry else None


def _cache_entry(output: Any) -> tuple[str, Any] | None:
    # by the keys really set: from 5.24 the old names are aliases that log a deprecation when read
    if hasattr(output, "keys"):
        keys = list(output.keys())
        return next(((n, output[n]) for n in _CACHE_NAMES if n in keys and output[n] is not None), None)
    return next(((n, getattr(output, n)) for n in _CACHE_NAMES if getattr(output, n, None) is not None), None)


_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


# Six checks ask for a model's cache kind, and each asking is a forward (0.1 s on SmolLM2 on CPU): one answer per
# model, forward function and mode, dropped with the model.
_CACHE_KINDS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, bool], str | None]] = weakref.WeakKeyDictionary()


def cache_kind(model: Any, input_ids: Any) -> str | None:
    """``"kv"`` (keys and values), ``"recurrent"`` (only state-space layers: Mamba-style) or None (no cache kept)."""
    key = (getattr(model.forward, "__func__", model.forward), bool(getattr(model, "training", False)))
    try:
        known = _CACHE_KINDS.get(model)
    except TypeError:  # an object that cannot be weakly referenced: ask each time
        return _measured_cache_kind(model, input_ids)
    if known is not None and known[0] == key:
        return known[1]
    kind = _measured_cache_kind(model, input_ids)
    _CACHE_KINDS[model] = (key, kind)
    return kind


def _measured_cache_kind(model: Any, input_ids: Any) -> str | None:
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids[:, :2], use_cache=True)
    entry = _cache_entry(out)
    if entry is None:
        return None
    name, cache = entry
    return "recurrent" if name == "cache_params" or _state_space_only(cache) else "kv"


def _state_space_only(cache: Any) -> bool:
    try:
        from transformers.cache_utils import LinearAttentionLayer
    except ImportError:  # a version without it
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, LinearAttentionLayer) for layer in layers)


def carries_state(model: Any) -> bool:
    """Whether the model carries a recurrent, state-space, linear-attention or convolution state from token to
    token (in some layers at least), read from the config's layer types and the forward's ``cache_params``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = [*(getattr(config, "layer_types", None) or []), *(getattr(config, "layers_block_type", None) or [])]
    stateful = ("mamba", "linear", "recurrent", "conv", "rwkv", "ssm", "hybrid")  # hybrid: attention + a conv state
    return any(word in str(kind) for kind in kinds for word in stateful) or (
        "cache_params" in inspect.signature(model.forward).parameters
    )


# A model that carries a recurrent or linear-attention state scores one forward with a chunked scan and the same
# tokens through the cache with another split of it (or the step recurrence): different algorithms, whose float32
# rounding of the state reached 2.1e-4 in the scores on tiny qwen4_exp_text (padded batches of up to 16 rows of up to
# 48 tokens; 1.3e-4 over 512 tokens), 1.2e-4 on Qwen3.5-MoE and 9.5e-5 on Qwen3-Next, past the table's 1e-4; a state
# restarted or misplaced is off by 0.1 and more.
STATE_ROUNDING = 3e-4


def state_rounding_tolerance(model: Any, tolerance: Tolerance) -> tuple[Tolerance, str | None]:
    """``tolerance`` with ``STATE_ROUNDING`` added to ``atol`` for a model that carries a state, and the note that
    says so (None for other models)."""
    if not carries_state(model):
        return tolerance, None
    widened = Tolerance(tolerance.atol + STATE_ROUNDING, tolerance.rtol, tolerance.noise, tolerance.noise_source)
    return widened, f"atol + {STATE_ROUNDING:g} for the rounding of a recurrent/linear-attention state"


def default_positions_differ(model: Any, input_ids: Any, tolerance: Tolerance) -> str | None:
    """Why ``generate`` and a plain forward disagree, when the model's default positions are the cause.

    ``generate`` passes ``position_ids`` counted from 0; a model whose forward counts
    from elsewhere when given none (RoBERTa-style embeddings start at padding_idx + 1)
    then scores differently under ``generate`` than under its own forward.
    """
    import torch

    counted_from_zero = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    own = forward_logits(model, input_ids)[0, -1]
    try:
        as_generate = forward_logits(model, input_ids, position_ids=counted_from_zero)[0, -1]
    except TypeError:  # a forward that takes no position_ids (checked by calling: **kwargs hides them)
        return None
    difference = float((own - as_generate).abs().max())
    if difference <= tolerance.bound(float(own.abs().max())):
        return None
    return (
        "the forward's default positions are not the ones generate passes (counted from 0): last-token scores "
        f"differ by {difference:.3g} between forward(input_ids) and forward(input_ids, position_ids=0..n-1)"
    )


def encode(tokenizer: Any, text: str, device: Any) -> Any:
    """``(1, seq)`` input ids of ``text`` on ``device``, with the tokenizer's usual special tokens."""
    return tokenizer(text, return_tensors="pt")["input_ids"].to(device)


def id_tensor(rows: Sequence[Sequence[int]], device: Any) -> Any:
    """Rows of token ids (all of one length) as a long tensor on ``device``."""
    import torch

    return torch.tensor(rows, dtype=torch.long, device=device)


def natural_ids(tokenizer: Any, length: int, device: Any) -> Any:
    """``(1, length)`` ids of natural text: the prompt texts, repeated."""
    import torch

    text = " ".join(DEFAULT_TEXTS)
    ids = tokenizer(text)["input_ids"]
    more = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids += more
    return torch.tensor([ids[:length]], device=device)


def forward_logits(model: Any, input_ids: Any, **kwargs: Any) -> Any:
    """Float32 logits of one forward pass without gradients."""
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits.float()


def names_position_ids(model: Any) -> bool:
    """Whether ``model.forward`` names ``position_ids``: ``generate`` passes them only then."""
    return "position_ids" in inspect.signature(model.forward).parameters


def uses_position_ids(model: Any, input_ids: Any, **kwargs: Any) -> bool:
    """Whether the forward reads ``position_ids``, probed by calling it (``forward(**kwargs)`` hides what a custom
    model uses): stretched, not shifted, since rotary embeddings see only relative positions."""
    import torch

    stretched = torch.arange(input_ids.shape[1], device=input_ids.device)[None] * 2
    try:
        moved = forward_logits(model, input_ids, position_ids=stretched, **kwargs)[0, -1]
    except TypeError:
        return False
    return not torch.equal(forward_logits(model, input_ids, **kwargs)[0, -1], moved)


@dataclass(frozen=True)
class ScoreMismatch:
    """Where and by how much two score tensors of shape ``(seq, vocab)`` disagree."""

    first_position: int
    worst_position: int
    worst_token_id: int
    expected: float
    actual: float
    greatest_difference: float
    mismatched: int
    total: int

    def describe(
        self, tokenizer: Any, tolerance: Tolerance, *, position_label: str = "position"
    ) -> list[tuple[str, object]]:
        share = 100.0 * self.mismatched / max(self.total, 1)
        return [
            (f"first {position_label}", self.first_position),
            (
                "greatest |difference|",
                f"{self.greatest_difference:.6g} at {position_label} {self.worst_position}, "
                f"score of {token(tokenizer, self.worst_token_id)}: expected {self.expected:.6g}, got {self.actual:.6g}",
            ),
            ("tolerance", str(tolerance)),
            *(
                [("vs noise floor", f"difference {self.greatest_difference / tolerance.noise:.1f}x the noise floor")]
                if tolerance.noise
                else []
            ),
            ("mismatched elements", f"{self.mismatched} / {self.total} ({share:.2f}%)"),
        ]


def compare_scores(expected: Any, actual: Any, tolerance: Tolerance) -> ScoreMismatch | None:
    """Compare ``(seq, vocab)`` scores elementwise; None when all are within tolerance.

    Non-finite values count as mismatches unless both sides hold the same infinity.
    """
    import torch

    expected = expected.detach().float().cpu()
    actual = actual.detach().float().cpu()
    if expected.shape != actual.shape:
        raise ValueError(f"score shapes differ: expected {tuple(expected.shape)}, got {tuple(actual.shape)}")
    same_inf = torch.isinf(expected) & (expected == actual)
    difference = (actual - expected).abs()
    difference = torch.where(same_inf, torch.zeros_like(difference), difference)
    difference = torch.nan_to_num(difference, nan=float("inf"))
    bound = tolerance.atol + tolerance.rtol * expected.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    bad = difference > bound
    if not bool(bad.any()):
        return None
    bad_positions = bad.reshape(bad.shape[0], -1).any(dim=-1).nonzero().flatten()
    flat_worst = int(torch.argmax(torch.where(bad, difference, torch.zeros_like(difference))))
    worst_position, worst_token = divmod(flat_worst, expected.shape[-1])
    return ScoreMismatch(
        first_position=int(bad_positions[0]),
        worst_position=worst_position,
        worst_token_id=worst_token,
        expected=float(expected.reshape(-1)[flat_worst]),
        actual=float(actual.reshape(-1)[flat_worst]),
        greatest_difference=float(difference.reshape(-1)[flat_worst]),
        mismatched=int(bad.sum()),
        total=bad.numel(),
    )


@dataclass
class CheckResult:
    """What a passing check measured: the greatest score difference it saw, a headline figure, and notes."""

    invariant: str
    greatest_difference: float = 0.0
    tolerance: Tolerance | None = None
    notes: list[str] | None = None
    figure: tuple[str, float] | None = None  # (label, value) shown instead of the difference, e.g. ("KL mean", 0.002)
    near_tie: bool = False

    def observe(self, expected: Any, actual: Any) -> None:
        """Fold the greatest |expected - actual| of one comparison into the result."""
        difference = (actual.detach().float().cpu() - expected.detach().float().cpu()).abs()
        finite = difference[difference.isfinite()]
        if finite.numel():
            self.greatest_difference = max(self.greatest_difference, float(finite.max()))

    def as_dict(self) -> dict[str, Any]:
        """Plain data for reports (survives pytest-xdist and junitxml)."""
        figure = self.figure
        if figure is None and self.tolerance is not None:
            figure = ("Δ", self.greatest_difference)
        return {
            "invariant": self.invariant,
            "greatest_difference": self.greatest_difference if self.tolerance is not None else None,
            "tolerance": self.tolerance.as_dict() if self.tolerance is not None else None,
            "figure": list(figure) if figure is not None else None,
            "near_tie": self.near_tie,
            "notes": list(self.notes or []),
        }

    def note(self, text: str) -> None:
        self.notes = [*(self.notes or []), text]

    def __str__(self) -> str:
        parts = [f"greatest |difference| {self.greatest_difference:.3g} ({self.tolerance})"] if self.tolerance else []
        return f"{self.invariant}: " + "; ".join([*parts, *(self.notes or [])])


def check_scores(
    result: CheckResult,
    expected: Any,
    actual: Any,
    tolerance: Tolerance,
) -> ScoreMismatch | None:
    """compare_scores that also records the greatest difference in ``result``."""
    result.observe(expected, actual)
    return compare_scores(expected, actual, tolerance)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id generation stops at: generation_config's (may be a list), else config's, else the tokenizer's."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return set()


def pad_id(model: Any, tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad, else its eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, *sorted(eos_ids(model, tokenizer))):
        if value is not None:
            return int(value)
    return 0


def padded_batch(
    tokenizer: Any, texts: Sequence[str], device: Any, pad_token_id: int, side: str = "left"
) -> tuple[Any, Any, Any]:
    """``(input_ids, attention_mask, position_ids)`` of ``texts`` padded on ``side``, positions counted from the mask.

    Built by hand so the tokenizer's own padding side and pad token do not matter.
    """
    return padded_rows([tokenizer(text)["input_ids"] for text in texts], device, pad_token_id, side)


def padded_rows(
    rows: Sequence[Sequence[int]], device: Any, pad_token_id: int, side: str = "left"
) -> tuple[Any, Any, Any]:
    """``padded_batch`` of rows of token ids."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)
