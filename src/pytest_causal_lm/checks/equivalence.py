"""Equivalent paths: one engine that compares ways of computing the same rows' next-token scores over sampled
combinations, and shrinks a disagreement to the smallest case.

The named invariants compare the combinations someone thought of (a padded batch of 16 without a cache, one row
through the cache in chunks). Bugs live in combinations: a serving kernel that drops the padding mask only for
cached steps of batches over 8 rows passes every one of them. Here hypothesis draws cases (how many rows, how long,
where in a natural text each starts, left padding, where the cache cuts the batch), each row must score as it
does alone, and a failing case is shrunk (fewer rows, shorter, fewer cuts) before it is reported in the suite's
usual format. Seeded, with no example database, so a run is repeatable and writes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..tolerances import Tolerance
from ._common import (
    CheckResult,
    cache_kind,
    cache_kwargs,
    check_scores,
    default_positions_differ,
    error_failure,
    failure,
    id_tensor,
    mismatch_failure,
    names_position_ids,
    natural_ids,
    pad_id,
    padded_rows,
    resolve_tolerance,
    returned_cache,
    state_rounding_tolerance,
    text_of,
)
from ._localise import Replay, Side
from .attention import implementation, runnable_implementations
from .context import default_prefill_tokens, promised_length
from .packing import packing_unpromised

__all__ = [
    "CACHED",
    "PACKED",
    "PADDED",
    "RIGHT_PADDED",
    "Case",
    "assert_equivalent_paths_agree",
    "default_row_tokens",
    "hypothesis_missing",
]

PADDED = "padded batch"
RIGHT_PADDED = "right-padded batch"
CACHED = "padded batch through the cache"
PACKED = "packed row"
MAX_ROWS = 16
DEFAULT_EXAMPLES = 100  # for a direct call (25 missed 3 of the 7 bugs in the tests); the suite draws the option
# The longest rows drawn by default (``default_row_tokens``).
LONG_ROW_TOKENS = 512
HALF_ROW_TOKENS = 128
SHORT_ROW_TOKENS = 48
_MAX_CUTS = 3
_DECODE_STEPS = 3
# A packed row holds every drawn row, each cut to its share of this many times the longest row allowed, capped by
# the model's promised length: restarting positions does not lift it (GPT-Neo's causal-mask buffer has 512 rows).
_PACK_BUDGET = 4


@dataclass(frozen=True)
class Case:
    """One drawn combination: each row's ``(start, length)`` in the text stream, the path, for the cached path the
    positions of the padded batch where a new chunk starts (none: one cached forward), and the attention
    implementation of the batch's forwards ("": the loaded one; a row alone always runs under the loaded one)."""

    rows: tuple[tuple[int, int], ...]
    path: str
    cuts: tuple[int, ...] = ()
    attention: str = ""

    @property
    def width(self) -> int:
        return max(length for _, length in self.rows)

    def offset(self, index: int) -> int:
        """Where row ``index``'s first token sits in its row of the batch."""
        if self.path == PACKED:
            return sum(length for _, length in self.rows[:index])
        if self.path == RIGHT_PADDED:
            return 0
        return self.width - self.rows[index][1]

    def describe(self) -> str:
        lengths = ", ".join(str(length) for _, length in self.rows)
        rows = f"{len(self.rows)} row{'s' if len(self.rows) > 1 else ''} of {lengths} tokens"
        padded = any(n < self.width for _, n in self.rows)
        how = {
            PADDED: f"{'left-padded to ' + str(self.width) if padded else 'no padding'}, one forward",
            RIGHT_PADDED: f"{'right-padded to ' + str(self.width) if padded else 'no padding'}, one forward with "
            "an attention_mask and no position_ids (as model(**tokenizer(texts, padding=True)) calls it)",
            CACHED: f"{'left-padded to ' + str(self.width) if padded else 'no padding'}, fed through the cache in "
            f"chunks starting at {[0, *self.cuts]}",
            PACKED: "packed in one row, position_ids restarting at 0 per row, no attention_mask, no cache",
        }[self.path]
        return f"{rows}, {how}" + (f", under {self.attention} attention" if self.attention else "")


def hypothesis_missing() -> str | None:
    """Why the engine cannot draw cases here, or None. hypothesis is an extra, not a dependency: its pytest
    plugin imports all of it at the end of every pytest run where it is installed."""
    try:
        found = importlib.util.find_spec("hypothesis") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or None in sys.modules: blocked on purpose
        found = False
    if found:
        return None
    return (
        "equivalent paths draw their cases with hypothesis, which is not installed: "
        "pip install 'pytest-causal-lm[equivalence]'"
    )


class _WrongShape(Exception):
    """A path returned scores for another number of rows or positions than it was given."""


@dataclass
class _Engine:
    """The model, the text stream rows are cut from, the paths and implementations drawn, and what the drawn
    cases measured."""

    model: Any
    tokenizer: Any
    stream: list[int]
    tolerance: Tolerance
    result: CheckResult
    paths: list[str]
    implementations: list[str]  # "" first: the loaded one
    pack_budget: int  # the longest packed row
    long_tolerance: Tolerance  # for cases longer than HALF_ROW_TOKENS (``_long_row_bound``)
    alone: dict[tuple[tuple[int, int], str], Any] = field(default_factory=dict)
    compared: int = 0

    def row_ids(self, row: tuple[int, int]) -> list[int]:
        start, length = row
        return self.stream[start : start + length]

    def scores_alone(self, row: tuple[int, int], attention: str = "") -> Any:
        """The row's scores in a forward of its own under ``attention`` (cached: shrinking revisits rows). Each
        implementation is compared with itself: how far eager and sdpa round apart is the attention invariant's
        question, and in half precision long rows take them past the tolerance."""
        if (row, attention) not in self.alone:
            self.alone[row, attention] = _alone(self, row, attention)()
        return self.alone[row, attention]

    def tolerance_for(self, case: Case) -> Tolerance:
        """The bound for ``case``: half precision's short-prompt calibration up to ``HALF_ROW_TOKENS`` tokens in the
        batch, a long row's noise floor past them."""
        extent = sum(length for _, length in case.rows) if case.path == PACKED else case.width
        return self.long_tolerance if extent > HALF_ROW_TOKENS else self.tolerance

    def first_mismatch(self, case: Case) -> tuple[int, Any] | None:
        """``(row, mismatch)`` of the first row of ``case`` that scores unlike it does alone, or None."""
        scores = _run(self, case)()
        self.compared += 1
        packed = sum(length for _, length in case.rows)
        expected = (1, packed) if case.path == PACKED else (len(case.rows), case.width)
        if tuple(scores.shape[:2]) != expected:
            raise _WrongShape(f"scores of shape {tuple(scores.shape)} for {expected[0]} rows of {expected[1]} tokens")
        for index, row in enumerate(case.rows):
            at, length = case.offset(index), row[1]
            batch_row = scores[0 if case.path == PACKED else index, at : at + length]
            alone = self.scores_alone(row, case.attention)
            mismatch = check_scores(self.result, alone, batch_row, self.tolerance_for(case))
            if mismatch:
                return index, mismatch
        return None


def _inputs(engine: _Engine, case: Case) -> dict[str, Any]:
    """The batch as each path calls the model: left padding with ``position_ids`` as ``generate`` passes them,
    right padding with the mask alone, a packed row with restarting ``position_ids`` and no mask."""
    rows = [engine.row_ids(row) for row in case.rows]
    device = engine.model.device
    if case.path == PACKED:
        positions = [p for ids in rows for p in range(len(ids))]
        return {
            "input_ids": id_tensor([[token for ids in rows for token in ids]], device),
            "position_ids": id_tensor([positions], device),
            "use_cache": False,
        }
    side = "right" if case.path == RIGHT_PADDED else "left"
    ids, mask, positions = padded_rows(rows, device, pad_id(engine.model, engine.tokenizer), side=side)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if side == "left" and names_position_ids(engine.model):
        inputs["position_ids"] = positions
    return inputs


def _alone(engine: _Engine, row: tuple[int, int], attention: str) -> Any:
    """The row's forward of its own, replayable."""
    import torch

    @torch.no_grad()
    def run() -> Any:
        with implementation(engine.model, attention):
            return engine.model(input_ids=id_tensor([engine.row_ids(row)], engine.model.device)).logits[0].float()

    return run


def _run(engine: _Engine, case: Case) -> Any:
    """The case's path as a replayable function returning the batch's scores ``(rows, width, vocab)``, under the
    case's attention implementation (the loaded one is restored)."""
    import torch

    inputs, model = _inputs(engine, case), engine.model
    edges = [0, *case.cuts, case.width]

    def chunked() -> Any:
        cache, pieces = None, []
        for start, stop in itertools.pairwise(edges):
            piece = {name: value[:, start:stop] for name, value in inputs.items() if name != "attention_mask"}
            out = model(
                **piece, attention_mask=inputs["attention_mask"][:, :stop], **cache_kwargs(model, cache), use_cache=True
            )
            cache = returned_cache(out)
            pieces.append(out.logits.float())
        return torch.cat(pieces, dim=1)

    @torch.no_grad()
    def run() -> Any:
        with implementation(model, case.attention):
            return chunked() if case.path == CACHED else model(**inputs).logits.float()

    return run


def _cases(stream_length: int, max_rows: int, max_tokens: int, engine: _Engine) -> Any:
    """Cases that shrink towards one short row, one left-padded forward, no cuts, the loaded implementation."""
    from hypothesis import strategies as st

    row = st.integers(1, max_tokens).flatmap(lambda n: st.tuples(st.integers(0, stream_length - n), st.just(n)))
    # the batch size drawn first, evenly: a list's own size would rarely pass the 8 rows where kernels switch path
    rows = st.integers(1, max_rows).flatmap(lambda n: st.lists(row, min_size=n, max_size=n)).map(tuple)

    def with_path(drawn: tuple[tuple[tuple[int, int], ...], str, str]) -> Any:
        rows, path, attention = drawn
        width = max(length for _, length in rows)
        if path == PACKED:  # every row packed, each cut to its share of the budget
            share = max(1, engine.pack_budget // len(rows))
            rows = tuple((start, min(length, share)) for start, length in rows)
        if path != CACHED or width < 2:
            return st.just(Case(rows, path, attention=attention))
        # a chunked prefill, then single-token steps as generate takes them
        prefill = st.lists(st.integers(1, width - 1), max_size=_MAX_CUTS, unique=True)
        steps = st.integers(0, min(_DECODE_STEPS, width - 1))

        def case(drawn: tuple[list[int], int]) -> Case:
            found, decoded = drawn
            cuts = {*found, *range(width - decoded, width)}
            return Case(rows, path, tuple(sorted(cuts)), attention)

        return st.tuples(prefill, steps).map(case)

    drawn = st.tuples(rows, st.sampled_from(engine.paths), st.sampled_from(engine.implementations))
    return drawn.flatmap(with_path)


def _fails(engine: _Engine, case: Case) -> bool:
    try:
        return engine.first_mismatch(case) is not None
    except Exception:  # an error is a failing case too: shrink it like one
        engine.compared += 1
        return True


def default_row_tokens(model: Any) -> int:
    """The longest row drawn by default, capped by the length the model promises (its position table,
    ``max_position_embeddings``): 512 tokens where forwards are cheap (an accelerator, or up to 10M parameters on
    CPU), 48 otherwise. Half precision's rows past 128 tokens get their own bound (``_long_row_bound``)."""
    if str(model.device).startswith("cpu") and default_prefill_tokens(model)[0] == 0:
        return promised_length(model, SHORT_ROW_TOKENS)[0]
    return promised_length(model, LONG_ROW_TOKENS)[0]


def _long_row_bound(
    model: Any, tokenizer: Any, row: list[int], tolerance: Tolerance
) -> tuple[Tolerance, int, str | None]:
    """The tolerance for cases longer than ``HALF_ROW_TOKENS``, the longest row, and the note that says how.

    Half precision's tolerance is calibrated on short prompts, and its rounding grows with the keys a score sums
    over: a 600-token packed row of tiny Llama in bfloat16 rounded one score 2.6x that floor away from the row
    alone, while rows of 128 stayed under 0.42x the bound over 100 draws. Rows longer than ``HALF_ROW_TOKENS``
    are judged against the noise floor of one row as long as the longest drawn (the run dtype against float32 on
    the same weights), shorter ones keep the short-prompt bound (a MoE whose routing flips in bfloat16 has a long
    row's floor in whole logits); where it cannot be measured (no room for float32 weights, a nondeterministic
    model), rows stay at ``HALF_ROW_TOKENS``."""
    import torch

    from ..precision import calibrated_tolerance, measure_noise_floor

    if model.dtype not in (torch.float16, torch.bfloat16) or len(row) <= HALF_ROW_TOKENS:
        return tolerance, len(row), None
    noise = measure_noise_floor(model, tokenizer, [text_of(tokenizer, row)])
    if noise is None or noise.value == float("inf"):
        note = f"rows of up to {HALF_ROW_TOKENS} tokens: no noise floor of a {len(row)}-token row could be measured"
        return tolerance, HALF_ROW_TOKENS, note
    bound = calibrated_tolerance(tolerance, noise)
    note = f"past {HALF_ROW_TOKENS} tokens: atol {bound.atol:.3g}, {noise.factor:g}x the {noise} on one {len(row)}-token row"
    return bound, len(row), note


def assert_equivalent_paths_agree(
    model: Any,
    tokenizer: Any,
    *,
    examples: int = DEFAULT_EXAMPLES,
    max_rows: int = MAX_ROWS,
    max_tokens: int | None = None,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Every row of ``examples`` drawn cases scores as it does alone: 1 to ``max_rows`` rows of 1 to
    ``max_tokens`` tokens of natural text (default: ``default_row_tokens``), left-padded in one forward or fed
    through the cache in up to 3 chunks, right-padded, or packed in one row, under each attention implementation
    the model runs here. A failing case is shrunk to the smallest one hypothesis finds, then reported.
    ``examples=0`` skips."""
    __tracebackhide__ = True
    if examples <= 0:
        pytest.skip("equivalent paths: no cases to draw (examples=0; --causal-lm-equivalence-examples=N draws N)")
    missing = hypothesis_missing()
    if missing:
        raise ImportError(missing)
    from hypothesis.errors import NoSuchExample

    tolerance, widened = state_rounding_tolerance(model, resolve_tolerance(model, tolerance))
    wanted = max_tokens or default_row_tokens(model)
    stream = natural_ids(tokenizer, 4 * wanted, model.device)[0].tolist()
    long_tolerance, max_tokens, bounded = _long_row_bound(model, tokenizer, stream[:wanted], tolerance)
    result = CheckResult("equivalent paths", tolerance=tolerance)
    for note in (widened, bounded):
        if note:
            result.note(note)
    pack_budget = promised_length(model, _PACK_BUDGET * max_tokens)[0]
    paths, implementations = _drawn_paths(model, stream, result)
    engine = _Engine(model, tokenizer, stream, tolerance, result, paths, implementations, pack_budget, long_tolerance)
    try:
        with _hypothesis_isolated():
            smallest = _find(_cases(len(stream), max_rows, max_tokens, engine), engine, examples, seed)
    except NoSuchExample:
        implementations = ", ".join(
            dict.fromkeys(name or model.config._attn_implementation for name in engine.implementations)
        )
        result.note(
            f"{engine.compared} drawn cases agree: up to {max_rows} rows of up to {max_tokens} tokens; "
            f"{', '.join(dict.fromkeys(engine.paths))}"
            f"{f' (up to {engine.pack_budget} tokens)' if PACKED in engine.paths else ''}; "
            f"under {implementations} attention"
        )
        return result
    _report(engine, smallest)
    raise AssertionError(f"equivalent paths: {smallest.describe()} failed once and then agreed: not deterministic")


def _find(cases: Any, engine: _Engine, examples: int, seed: int) -> Case:
    """The smallest failing case hypothesis finds in ``examples`` draws (seeded, no database, quiet)."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings

    budget = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    return find(cases, lambda case: _fails(engine, case), settings=budget, random=random.Random(seed))


def _drawn_paths(model: Any, stream: list[int], result: CheckResult) -> tuple[list[str], list[str]]:
    """The paths and attention implementations this model is promised to agree on, each left out with a note."""
    paths = [PADDED, RIGHT_PADDED]
    if cache_kind(model, id_tensor([stream[:2]], model.device)) == "kv":
        paths += [CACHED, CACHED]  # twice the draws: its cuts make the most combinations, and the most bugs
    else:
        result.note(f"{CACHED} not drawn: no key/value cache to cut")
    unpromised = packing_unpromised(model, stream[:16])
    if unpromised:
        result.note(f"{PACKED} not drawn: {unpromised}")
    else:
        paths.append(PACKED)
    runnable, passed_over = runnable_implementations(model)
    if passed_over:
        names = ", ".join(reason.split(" (")[0] for reason in passed_over)
        result.note(f"attention implementations not drawn, not runnable here: {names}")
    others = runnable[1:]  # drawn in half the cases together, the loaded one ("") in the other half
    return paths, [""] * max(1, len(others)) + others


def _likely_cause(engine: _Engine, case: Case, index: int) -> list[tuple[str, str]]:
    """Positions, the usual cause of a row scoring unlike itself alone: the engine passes ``position_ids`` as
    ``generate`` does, and a forward that takes none cannot skip left padding."""
    row, offset = case.rows[index], case.offset(index)
    if not names_position_ids(engine.model):
        if offset and case.path != RIGHT_PADDED:
            return [("likely cause", "the forward takes no position_ids: left padding moves the row's tokens on")]
        return []
    differ = default_positions_differ(
        engine.model, id_tensor([engine.row_ids(row)], engine.model.device), engine.tolerance_for(case)
    )
    return [("likely cause", differ)] if differ else []


@contextlib.contextmanager
def _hypothesis_isolated() -> Iterator[None]:
    """hypothesis for this check alone, so a seed draws the same cases in every project and test order:

    - its caches go to a temporary directory (it writes ``.hypothesis/`` in the working directory even without
      an example database);
    - no constants from the project's own modules: it draws 5% of integers from the literals of every local
      module loaded so far, so the same seed drew another smallest case in the test suite than in a script.
      That hook is internal; a hypothesis without it is left as it is.
    """
    from hypothesis.configuration import set_hypothesis_home_dir, storage_directory
    from hypothesis.internal.conjecture import providers

    before = storage_directory(intent_to_write=False).home_directory
    hooks = ("_get_local_constants", "CONSTANTS_CACHE")
    saved = {name: getattr(providers, name) for name in hooks if hasattr(providers, name)}
    with tempfile.TemporaryDirectory(prefix="causal-lm-hypothesis-") as home:
        set_hypothesis_home_dir(home)
        if len(saved) == len(hooks):
            providers._get_local_constants, providers.CONSTANTS_CACHE = _no_local_constants(providers)
        try:
            yield
        finally:
            set_hypothesis_home_dir(before)
            for name, value in saved.items():
                setattr(providers, name, value)


def _no_local_constants(providers: Any) -> tuple[Any, Any]:
    """A ``_get_local_constants`` that finds none, and an empty cache of the constants drawn from."""
    from hypothesis.internal.constants_ast import Constants

    empty = Constants()
    return (lambda: empty), type(providers.CONSTANTS_CACHE)(1024)


def _report(engine: _Engine, case: Case) -> None:
    """Re-run the smallest failing case and raise its failure, with the module that departs first."""
    __tracebackhide__ = True
    try:
        found = engine.first_mismatch(case)
    except _WrongShape as exc:
        raise failure(f"equivalent paths: {case.describe()} gave {exc}", engine.model, []) from None
    except Exception as exc:
        raise error_failure(exc, engine.model, f"equivalent paths: {case.describe()}") from exc
    if found is None:
        return
    index, mismatch = found
    row, offset = case.rows[index], case.offset(index)
    at = offset + mismatch.first_position
    chunk = sum(1 for cut in case.cuts if cut <= at)
    start = ([0, *case.cuts])[chunk]
    replay = Replay(
        Side(f"row {index} alone", _alone(engine, row, case.attention)),
        Side(case.path, _run(engine, case), call=chunk, row=0 if case.path == PACKED else index, offset=start - offset),
        (mismatch.first_position,),
    )
    side = "right" if case.path == RIGHT_PADDED else "left"
    where = (
        f"{offset} tokens before it in the packed row"
        if case.path == PACKED
        else f"{case.width - row[1]} pad tokens on the {side}"
    )
    raise mismatch_failure(
        f"equivalent paths: row {index} of the smallest failing case ({case.describe()}) scores unlike the row "
        f"alone from position {mismatch.first_position}",
        engine.model,
        engine.tokenizer,
        [
            ("row", text_of(engine.tokenizer, engine.row_ids(row))),
            ("offset" if case.path == PACKED else "padding", where),
            ("drawn", f"{engine.compared} cases, shrunk to this one (hypothesis, seeded, no database)"),
            *_likely_cause(engine, case, index),
        ],
        mismatch,
        engine.tolerance_for(case),
        replay=replay,
    )
