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

__all__ = ["CACHED", "PADDED", "Case", "assert_equivalent_paths_agree"]

PADDED = "padded batch"
CACHED = "padded batch through the cache"
MAX_ROWS = 16
DEFAULT_EXAMPLES = 25  # for a direct call; the suite draws --causal-lm-equivalence-examples
MAX_TOKENS = 48
_MAX_CUTS = 3


@dataclass(frozen=True)
class Case:
    """One drawn combination: each row's ``(start, length)`` in the text stream, the path, and for the cached
    path the positions of the padded batch where a new chunk starts (none: one cached forward)."""

    rows: tuple[tuple[int, int], ...]
    path: str
    cuts: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return max(length for _, length in self.rows)

    def describe(self) -> str:
        lengths = ", ".join(str(length) for _, length in self.rows)
        rows = f"{len(self.rows)} row{'s' if len(self.rows) > 1 else ''} of {lengths} tokens"
        padded = f"left-padded to {self.width}" if any(n < self.width for _, n in self.rows) else "no padding"
        how = "one forward" if self.path == PADDED else f"fed through the cache in chunks starting at {[0, *self.cuts]}"
        return f"{rows}, {padded}, {how}"


class _WrongShape(Exception):
    """A path returned scores for another number of rows or positions than it was given."""


@dataclass
class _Engine:
    """The model, the text stream rows are cut from, and what the drawn cases measured."""

    model: Any
    tokenizer: Any
    stream: list[int]
    tolerance: Tolerance
    result: CheckResult
    alone: dict[tuple[int, int], Any] = field(default_factory=dict)
    compared: int = 0

    def row_ids(self, row: tuple[int, int]) -> list[int]:
        start, length = row
        return self.stream[start : start + length]

    def scores_alone(self, row: tuple[int, int]) -> Any:
        """The row's scores in a forward of its own (cached: shrinking revisits rows)."""
        import torch

        if row not in self.alone:
            ids = torch.tensor([self.row_ids(row)], device=self.model.device)
            with torch.no_grad():
                self.alone[row] = self.model(input_ids=ids).logits[0].float()
        return self.alone[row]

    def first_mismatch(self, case: Case) -> tuple[int, Any] | None:
        """``(row, mismatch)`` of the first row of ``case`` that scores unlike it does alone, or None."""
        scores = _run(self, case)()
        self.compared += 1
        if tuple(scores.shape[:2]) != (len(case.rows), case.width):
            raise _WrongShape(f"scores of shape {tuple(scores.shape)} for {len(case.rows)} rows of {case.width} tokens")
        for index, row in enumerate(case.rows):
            mismatch = check_scores(
                self.result, self.scores_alone(row), scores[index, case.width - row[1] :], self.tolerance
            )
            if mismatch:
                return index, mismatch
        return None


def _inputs(engine: _Engine, case: Case) -> dict[str, Any]:
    ids, mask, positions = padded_rows(
        [engine.row_ids(row) for row in case.rows], engine.model.device, pad_id(engine.model, engine.tokenizer)
    )
    inputs = {"input_ids": ids, "attention_mask": mask}
    if names_position_ids(engine.model):  # as generate passes them
        inputs["position_ids"] = positions
    return inputs


def _run(engine: _Engine, case: Case) -> Any:
    """The case's path as a replayable function returning the batch's scores ``(rows, width, vocab)``."""
    import torch

    inputs, model = _inputs(engine, case), engine.model
    edges = [0, *case.cuts, case.width]

    @torch.no_grad()
    def padded() -> Any:
        return model(**inputs).logits.float()

    @torch.no_grad()
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

    return padded if case.path == PADDED else chunked


def _cases(stream_length: int, max_rows: int, max_tokens: int, cached: bool) -> Any:
    """Cases that shrink towards one short row, one forward, no cuts."""
    from hypothesis import strategies as st

    row = st.integers(1, max_tokens).flatmap(lambda n: st.tuples(st.integers(0, stream_length - n), st.just(n)))
    rows = st.lists(row, min_size=1, max_size=max_rows).map(tuple)

    def with_path(drawn: tuple[tuple[tuple[int, int], ...], str]) -> Any:
        rows, path = drawn
        width = max(length for _, length in rows)
        if path == PADDED or width < 2:
            return st.just(Case(rows, path))
        cuts = st.lists(st.integers(1, width - 1), max_size=_MAX_CUTS, unique=True)
        return cuts.map(lambda found: Case(rows, path, tuple(sorted(found))))

    return st.tuples(rows, st.sampled_from([PADDED, CACHED] if cached else [PADDED])).flatmap(with_path)


def _fails(engine: _Engine, case: Case) -> bool:
    try:
        return engine.first_mismatch(case) is not None
    except Exception:  # an error is a failing case too: shrink it like one
        engine.compared += 1
        return True


def assert_equivalent_paths_agree(
    model: Any,
    tokenizer: Any,
    *,
    examples: int = DEFAULT_EXAMPLES,
    max_rows: int = MAX_ROWS,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Every row of ``examples`` drawn cases (1 to ``max_rows`` rows of 1 to ``max_tokens`` tokens of natural
    text, left-padded, in one forward or fed through the cache in up to 3 chunks) scores as it does alone; a
    failing case is shrunk to the smallest one hypothesis finds, then reported. ``examples=0`` skips."""
    __tracebackhide__ = True
    if examples <= 0:
        pytest.skip("equivalent paths: no cases to draw (examples=0; --causal-lm-equivalence-examples=N draws N)")
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import NoSuchExample

    tolerance, widened = state_rounding_tolerance(model, resolve_tolerance(model, tolerance))
    result = CheckResult("equivalent paths", tolerance=tolerance)
    if widened:
        result.note(widened)
    stream = natural_ids(tokenizer, 4 * max_tokens, model.device)[0].tolist()
    engine = _Engine(model, tokenizer, stream, tolerance, result)
    cached = cache_kind(model, _ids(stream[:2], model.device)) == "kv"
    budget = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    try:
        with _hypothesis_writes_nowhere():
            smallest = find(
                _cases(len(stream), max_rows, max_tokens, cached),
                lambda c: _fails(engine, c),
                settings=budget,
                random=random.Random(seed),
            )
    except NoSuchExample:
        paths = f"{PADDED} and {CACHED}" if cached else f"{PADDED} (no key/value cache to cut)"
        result.note(f"{engine.compared} drawn cases agree: up to {max_rows} rows of up to {max_tokens} tokens, {paths}")
        return result
    _report(engine, smallest)
    raise AssertionError(f"equivalent paths: {smallest.describe()} failed once and then agreed: not deterministic")


def _likely_cause(engine: _Engine, row: tuple[int, int], pad: int) -> list[tuple[str, str]]:
    """Positions, the usual cause of a row scoring unlike itself alone: the engine passes ``position_ids`` as
    ``generate`` does, and a forward that takes none cannot skip the padding."""
    if not names_position_ids(engine.model):
        if pad:
            return [("likely cause", "the forward takes no position_ids: left padding moves the row's tokens on")]
        return []
    differ = default_positions_differ(engine.model, _ids(engine.row_ids(row), engine.model.device), engine.tolerance)
    return [("likely cause", differ)] if differ else []


@contextlib.contextmanager
def _hypothesis_writes_nowhere() -> Iterator[None]:
    """hypothesis caches what it collects (constants of local modules) under ``.hypothesis/`` in the working
    directory even without an example database: this check sends that to a temporary directory, then back."""
    from hypothesis.configuration import set_hypothesis_home_dir, storage_directory

    before = storage_directory(intent_to_write=False).home_directory
    with tempfile.TemporaryDirectory(prefix="causal-lm-hypothesis-") as home:
        set_hypothesis_home_dir(home)
        try:
            yield
        finally:
            set_hypothesis_home_dir(before)


def _ids(ids: list[int], device: Any) -> Any:
    """``(1, len)`` ids on ``device``."""
    import torch

    return torch.tensor([ids], device=device)


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
    row = case.rows[index]
    pad = case.width - row[1]
    at = pad + mismatch.first_position
    chunk = sum(1 for cut in case.cuts if cut <= at)
    start = ([0, *case.cuts])[chunk]
    replay = Replay(
        Side(f"row {index} alone", lambda: engine.model(input_ids=_ids(engine.row_ids(row), engine.model.device))),
        Side(case.path, _run(engine, case), call=chunk, row=index, offset=start - pad),
        (mismatch.first_position,),
    )
    raise mismatch_failure(
        f"equivalent paths: row {index} of the smallest failing case ({case.describe()}) scores unlike the row "
        f"alone from position {mismatch.first_position}",
        engine.model,
        engine.tokenizer,
        [
            ("row", text_of(engine.tokenizer, engine.row_ids(row))),
            ("padding", f"{pad} pad tokens on the left"),
            ("drawn", f"{engine.compared} cases, shrunk to this one (hypothesis, seeded, no database)"),
            *_likely_cause(engine, row, pad),
        ],
        mismatch,
        engine.tolerance,
        replay=replay,
    )
