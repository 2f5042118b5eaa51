"""Snapshots of what a checkpoint says, through syrupy: readable JSON, compared with tolerance.

A *behaviour record* holds, for a fixed prompt set: the tokenization, the greedy
continuation (ids, text and the top-two margin of every step), the top-k next
tokens with rounded log-probabilities at every position (the tutorial's
"previous text -> token with highest score" table), and the shape/vocab facts.
Token ids and text compare exactly, except that a greedy divergence where the
top two tokens nearly tied is reported (NearTieWarning), not failed;
log-probabilities compare within the tolerance stored in the snapshot.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .checks._common import DEFAULT_TEXTS, eos_ids, first_difference, pad_id
from .checks._generation import NearTieWarning, default_prompts, greedy_loop

__all__ = [
    "LOGPROB_TOLERANCES",
    "behaviour_record",
    "compare_records",
    "format_record",
    "record_missing_snapshot",
    "snapshot_extension",
]

# Absolute log-probability tolerance per dtype; float32 differs across CPUs/BLAS in the 5th decimal.
LOGPROB_TOLERANCES = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}
_DECIMALS = 4


def behaviour_record(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str] = DEFAULT_TEXTS,
    chat: bool = True,
    max_new_tokens: int = 12,
    top_k: int = 3,
    name: str | None = None,
) -> dict[str, Any]:
    """What ``model`` says about ``prompts`` (plus a chat-formatted prompt when ``chat`` and a template exist)."""
    dtype = str(model.dtype).removeprefix("torch.")
    config = model.config.get_text_config()
    cases = default_prompts(tokenizer, model.device, prompts)
    if not chat:
        cases = [case for case in cases if not case[0].startswith("chat ")]
    records = [_prompt_record(model, tokenizer, label, ids, max_new_tokens, top_k) for label, ids in cases]
    return {
        "model": name or Path(str(model.name_or_path)).name,
        "dtype": dtype,
        "tolerance": {"logprob": LOGPROB_TOLERANCES.get(dtype, LOGPROB_TOLERANCES["float32"])},
        "facts": {
            "architecture": type(model).__name__,
            "vocab_size": config.vocab_size,
            "len_tokenizer": len(tokenizer),
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "logits_shape": [1, len(records[0]["input_ids"]), config.vocab_size] if records else None,
            "special_token_ids": {
                "bos": tokenizer.bos_token_id,
                "eos": tokenizer.eos_token_id,
                "pad": pad_id(model, tokenizer),
                "generation_eos": getattr(model.generation_config, "eos_token_id", None),
            },
        },
        "prompts": records,
    }


def _prompt_record(model: Any, tokenizer: Any, label: str, ids: Any, max_new_tokens: int, top_k: int) -> dict[str, Any]:
    """One prompt's tokenization, top-k next tokens at every position and greedy continuation with its margins."""
    import torch

    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1).cpu()
    table = []
    for position in range(ids.shape[1]):
        values, indices = logprobs[position].topk(top_k)
        table.append(
            {
                "text": tokenizer.decode(ids[0, : position + 1].tolist()),
                "top": [
                    [tokenizer.decode([int(i)]), int(i), round(float(v), _DECIMALS)]
                    for v, i in zip(values, indices, strict=True)
                ],
            }
        )
    # the tutorial's loop gives the continuation and every step's scores in one pass (parity with
    # generate is its own invariant)
    run = greedy_loop(model, ids, max_new_tokens=max_new_tokens, stop_ids=eos_ids(model, tokenizer))
    margins = []
    for scores in run.step_scores:
        top = scores.log_softmax(-1).topk(2).values
        margins.append(round(float(top[0] - top[1]), _DECIMALS))
    return {
        "prompt": label,
        "input_ids": ids[0].tolist(),
        "greedy": {"ids": run.tokens, "text": tokenizer.decode(run.tokens), "margins": margins},
        "next_tokens": table,
    }


def format_record(record: Any, indent: int = 0) -> str:
    """JSON with one line per table row: small lists of numbers and strings stay on one line."""
    pad = "  " * indent
    compact = json.dumps(record, ensure_ascii=False)
    if indent >= 3 and len(compact) <= 120:  # table rows and small lists: one line each
        return compact
    if isinstance(record, dict):
        if not record:
            return "{}"
        items = [f"{pad}  {json.dumps(k)}: {format_record(v, indent + 1)}" for k, v in record.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(record, list) and any(isinstance(v, (dict, list)) and not _flat(v) for v in record):
        items = [f"{pad}  {format_record(v, indent + 1)}" for v in record]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(record, ensure_ascii=False)


def _flat(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)


def _token(entry: list[Any]) -> str:
    return f"{entry[0]!r} (id {entry[1]})"


def compare_records(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, near-tie notes) between a stored record and a fresh one, in words a person reads."""
    problems: list[str] = []
    notes: list[str] = []
    tolerance = max(old.get("tolerance", {}).get("logprob", 0.0), new.get("tolerance", {}).get("logprob", 0.0))
    for key in sorted(set(old.get("facts", {})) | set(new.get("facts", {}))):
        before, after = old.get("facts", {}).get(key), new.get("facts", {}).get(key)
        if before != after:
            problems.append(f"fact {key}: was {before!r}, now {after!r}")
    old_prompts = {p["prompt"]: p for p in old.get("prompts", [])}
    new_prompts = {p["prompt"]: p for p in new.get("prompts", [])}
    for label in old_prompts.keys() - new_prompts.keys():
        problems.append(f"prompt {label}: in the snapshot, not produced any more")
    for label in new_prompts.keys() - old_prompts.keys():
        problems.append(f"prompt {label}: new, not in the snapshot (run with --snapshot-update)")
    for label in [p for p in old_prompts if p in new_prompts]:
        before, after = old_prompts[label], new_prompts[label]
        if before["input_ids"] != after["input_ids"]:
            problems.append(
                f"prompt {label}: tokenization changed: was {before['input_ids']}, now {after['input_ids']}"
            )
            continue
        problems.extend(_compare_greedy(label, before["greedy"], after["greedy"], tolerance, notes))
        problems.extend(_compare_tables(label, before["next_tokens"], after["next_tokens"], tolerance, notes))
    # what a reader needs first: changed facts and continuations, then changed top tokens, then drift
    return sorted(problems, key=lambda text: ("log-probability of" in text, "top token was" in text)), notes


def _compare_tables(
    label: str, before: list[dict], after: list[dict], tolerance: float, notes: list[str]
) -> Iterator[str]:
    for position, (old_row, new_row) in enumerate(zip(before, after, strict=False)):
        where = f"prompt {label}, position {position} after {old_row['text']!r}"
        old_top, new_top = old_row["top"], new_row["top"]
        if old_top[0][1] != new_top[0][1]:
            old_margin = old_top[0][2] - old_top[1][2] if len(old_top) > 1 else float("inf")
            new_margin = new_top[0][2] - new_top[1][2] if len(new_top) > 1 else float("inf")
            change = (
                f"top token was {_token(old_top[0])} at {old_top[0][2]}, now {_token(new_top[0])} at {new_top[0][2]}"
            )
            if min(old_margin, new_margin) <= tolerance:
                notes.append(f"{where}: near-tie, {change} (top-two margin {min(old_margin, new_margin):.4g})")
            else:
                yield f"{where}: {change}"
                continue
        old_by_id = {entry[1]: entry for entry in old_top}
        for entry in new_top:
            previous = old_by_id.get(entry[1])
            if previous is not None and abs(previous[2] - entry[2]) > tolerance:
                yield (
                    f"{where}: log-probability of {_token(entry)} was {previous[2]}, now {entry[2]} "
                    f"(difference {abs(previous[2] - entry[2]):.4g} > tolerance {tolerance:g})"
                )
                break


def _compare_greedy(label: str, before: dict, after: dict, tolerance: float, notes: list[str]) -> Iterator[str]:
    old_ids, new_ids = before["ids"], after["ids"]
    if old_ids == new_ids:
        return
    step = first_difference(old_ids, new_ids) or 0
    margins = [m[step] for m in (before.get("margins", []), after.get("margins", [])) if step < len(m)]
    text = f"greedy continuation of {label} diverges at step {step}: was {before['text']!r}, now {after['text']!r}"
    if _ambiguous(before["text"], after["text"]):  # different tokens can decode to the same characters
        text += f" (ids from step {step}: was {old_ids[step : step + 6]}, now {new_ids[step : step + 6]})"
    if margins and min(margins) <= tolerance:
        notes.append(f"{text} (near-tie: top-two margin {min(margins):.4g} <= tolerance {tolerance:g})")
    else:
        yield text + (f" (top-two margin {min(margins):.4g} > tolerance {tolerance:g})" if margins else "")


def _ambiguous(before: str, after: str) -> bool:
    """Decoded text that cannot tell two token sequences apart: equal, or holding replacement/control characters."""
    return before == after or any(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\t") for ch in before + after)


def record_missing_snapshot(snapshot: Any, record: dict[str, Any], missing: str) -> None:
    """Deal with a target that has no stored snapshot yet (not under --snapshot-update, where syrupy writes it).

    ``missing="fail"`` fails saying so (syrupy alone shows only ``[- snapshot] == [+ received]``);
    ``"write"`` records it, whole or not at all, and skips: nothing was compared this run.
    """
    import pytest

    if snapshot.session.update_snapshots:
        return
    location = Path(snapshot.extension.get_location(test_location=snapshot.test_location, index=snapshot.index))
    if location.exists():
        return
    if missing != "write":
        raise AssertionError(
            f"no snapshot yet for this target ({location}); run --snapshot-update to record it, "
            "or set --causal-lm-snapshot-missing=write to record missing ones as they come"
        )
    location.parent.mkdir(parents=True, exist_ok=True)
    partial = location.with_name(location.name + ".partial")
    partial.write_text(snapshot.extension.serialize(record), encoding="utf-8")
    partial.replace(location)
    pytest.skip(f"no snapshot yet for this target: recorded it at {location}; the next run compares against it")


def snapshot_extension(root: str | Path, may_judge_unused: Callable[[str], bool] | None = None) -> type:
    """A syrupy extension class that stores behaviour records as JSON under ``root``.

    ``may_judge_unused(name)`` says whether this session may call the snapshot ``name`` unused (and so let
    ``--snapshot-update`` delete it): a snapshot of a target or test that did not run and pass here is not
    unused, only not looked at. Without it, every snapshot under ``root`` may be judged, as in plain syrupy.
    Create one class per session and root: syrupy groups snapshots by extension class.
    """
    from syrupy.data import SnapshotCollections
    from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

    class CausalLMSnapshotExtension(SingleFileSnapshotExtension):
        """One JSON file per test and target: ``<root>/<test file>/<test name>[<checkpoint-device-dtype>].json``."""

        _write_mode = WriteMode.TEXT
        file_extension = "json"
        snapshot_root = str(Path(root).resolve())

        def discover_snapshots(self, **kwargs: Any) -> SnapshotCollections:
            found = super().discover_snapshots(**kwargs)
            if may_judge_unused is None:
                return found
            judged = SnapshotCollections()
            for collection in found:
                if any(may_judge_unused(snapshot.name) for snapshot in collection):
                    judged.add(collection)
            return judged

        def serialize(self, data: Any, **kwargs: Any) -> str:
            if isinstance(data, str):
                return data
            return format_record(data) + "\n"

        @classmethod
        def dirname(cls, *, test_location: Any) -> str:
            return str(Path(cls.snapshot_root) / test_location.basename)

        def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
            try:
                problems, notes = compare_records(json.loads(snapshot_data), json.loads(serialized_data))
            except (TypeError, ValueError):
                return False
            for note in notes:
                warnings.warn(NearTieWarning(f"causal-lm snapshot: {note}"), stacklevel=2)
            return not problems

        def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
            try:
                yield from _difference_lines(serialized_data, snapshot_data)
            except ValueError:
                yield from super().diff_lines(serialized_data, snapshot_data)

    return CausalLMSnapshotExtension


def _difference_lines(serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
    """What a failing snapshot comparison shows, in words (ValueError for data that is no behaviour record)."""
    if not snapshot_data:
        yield "Run pytest with --snapshot-update to create it."
        return
    problems, notes = compare_records(json.loads(snapshot_data), json.loads(serialized_data))
    yield f"causal-lm snapshot differs ({len(problems)} difference(s); snapshot = before, this run = now):"
    for problem in problems[:20]:
        yield f"  - {problem}"
    if len(problems) > 20:
        yield f"  ... and {len(problems) - 20} more"
    for note in notes:
        yield f"  (accepted) {note}"
    yield "Run pytest with --snapshot-update to accept the new behaviour."
