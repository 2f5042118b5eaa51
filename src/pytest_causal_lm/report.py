"""The verdict per checkpoint at a glance: a terminal table, Markdown and JSON reports, failure context.

Built from test reports only (outcome + user properties), so it works the same
under pytest-xdist, where reports travel from workers to the controller.
"""

from __future__ import annotations

import json
import platform
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INVARIANTS", "Cell", "VerdictTable", "library_versions"]

# test name -> (short column header, invariant name)
INVARIANTS: dict[str, tuple[str, str]] = {
    "test_output_shapes": ("shap", "output shapes"),
    "test_logits_to_keep": ("keep", "logits_to_keep"),
    "test_vocab_alignment": ("voc", "vocab alignment"),
    "test_special_token_ids": ("ids", "special token ids"),
    "test_prefix_causality": ("caus", "prefix causality"),
    "test_determinism": ("det", "determinism"),
    "test_kv_cache_parity": ("kv", "KV-cache parity"),
    "test_cache_effectiveness": ("c1", "cache effectiveness"),
    "test_greedy_loop_parity": ("grdy", "greedy-loop parity"),
    "test_classification_head": ("cls", "classification head"),
    "test_padding_invariance": ("pad", "padding invariance"),
    "test_batch_independence": ("bat", "batch independence"),
    "test_chat_template": ("chat", "chat template"),
    "test_behaviour_snapshot": ("snap", "behaviour snapshot"),
    "test_reference_drift": ("ref", "reference drift"),
}
_DIFFERENCE = re.compile(r"(?:greatest \|difference\||KL mean)\s*:?\s*([-+0-9.e]+|nan|inf)")
_TOKENS_PER_STEP = re.compile(r"decoding steps fed \[([0-9, ]+)\] tokens/sequence")


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pytest-causal-lm": __version__,
    }


def device_name(device: str) -> str:
    """A human name for a device: the GPU's name, or the CPU's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device


@dataclass
class Cell:
    """One invariant on one target: outcome (ok, tie, FAIL, skip) and the figure worth showing."""

    outcome: str
    figure: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"outcome": self.outcome, "figure": self.figure, "detail": self.detail}


@dataclass
class VerdictTable:
    """Cells by target id and test name, filled from test reports."""

    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    speedups: dict[str, str] = field(default_factory=dict)

    def add_report(self, report: Any) -> None:
        """Fold one pytest TestReport (setup, call or teardown) into the table."""
        properties = dict(report.user_properties)
        where = properties.get("causal_lm_cell")
        if not where:
            return
        target, test = where["target"], where["test"]
        if test not in INVARIANTS:
            return
        self.devices.setdefault(target, where.get("device", ""))
        row = self.cells.setdefault(target, {})
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row[test] = Cell("skip", detail=reason.removeprefix("Skipped: "))
        elif report.failed:
            text = report.longreprtext
            match = _DIFFERENCE.search(text)
            first = next((line.strip() for line in text.splitlines() if line.strip().startswith("E ")), "")
            message = first.removeprefix("E").strip().removeprefix("AssertionError:").strip() or text.splitlines()[-1]
            row[test] = Cell(
                "FAIL" if report.when == "call" else "err", f"Δ {match.group(1)}" if match else "", message
            )
        elif report.when == "call":
            result = properties.get("causal_lm") or {}
            notes = result.get("notes") or []
            tie = any("near-tie" in note for note in notes)
            figure = ""
            if result.get("greatest_difference") is not None:
                figure = f"Δ {result['greatest_difference']:.2g}"
            if result.get("drift"):
                figure = f"KL {result['drift']['kl_mean']:.2g}"
            per_step = _TOKENS_PER_STEP.search(" ".join(notes))
            if per_step:
                figure = f"{per_step.group(1)} tok/step"
            row[test] = Cell("tie" if tie else "ok", figure, "; ".join(notes))

    def counts(self, target: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for cell in self.cells[target].values():
            found[cell.outcome] = found.get(cell.outcome, 0) + 1
        return found

    def terminal_lines(self, verbosity: int) -> list[str]:
        """``-q``: a line per target; default: the table and failures; ``-v``: every figure too."""
        lines = []
        if verbosity < 0:
            for target in self.cells:
                counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts(target).items()))
                lines.append(f"{target}: {counts}")
            return lines
        columns = [test for test in INVARIANTS if any(test in row for row in self.cells.values())]
        width = min(max(len("checkpoint-device-dtype"), *(len(t) for t in self.cells)), 32)
        lines.append(f"{'checkpoint-device-dtype':<{width}} " + " ".join(f"{INVARIANTS[t][0]:<4}" for t in columns))
        for target, row in self.cells.items():
            shown = target if len(target) <= width else target[: width - 1] + "~"
            lines.append(f"{shown:<{width}} " + " ".join(f"{row[t].outcome if t in row else '-':<4}" for t in columns))
        legend = "legend: " + ", ".join(f"{INVARIANTS[t][0]}={INVARIANTS[t][1]}" for t in columns)
        lines.extend(textwrap.wrap(legend, width=100, subsequent_indent="        "))
        for target, row in self.cells.items():
            for test, cell in row.items():
                if cell.outcome in ("FAIL", "err", "tie") or (verbosity > 0 and (cell.figure or cell.detail)):
                    figure = f" {cell.figure}" if cell.figure else ""
                    detail = f": {cell.detail}" if cell.detail and (verbosity > 0 or cell.outcome != "tie") else ""
                    lines.append(f"  {target} {INVARIANTS[test][1]} {cell.outcome}{figure}{detail}"[:300])
            if target in self.speedups:
                lines.append(f"  {target} KV-cache speedup {self.speedups[target]}")
        return lines

    def to_json(self, versions: dict[str, str], settings: list[str]) -> str:
        return json.dumps(
            {
                "versions": versions,
                "settings": settings,
                "targets": {
                    target: {
                        "device_name": self.devices.get(target, ""),
                        "speedup": self.speedups.get(target),
                        "invariants": {INVARIANTS[t][1]: cell.to_dict() for t, cell in row.items()},
                    }
                    for target, row in self.cells.items()
                },
            },
            indent=2,
        )

    def to_markdown(self, versions: dict[str, str], settings: list[str]) -> str:
        columns = [test for test in INVARIANTS if any(test in row for row in self.cells.values())]
        symbol = {"ok": "✅ pass", "tie": "✅ pass (near-tie)", "FAIL": "❌ FAIL", "err": "❌ error", "skip": "⏭ skip"}
        lines = ["## causal-lm verdict", ""]
        lines.append("| checkpoint-device-dtype | " + " | ".join(INVARIANTS[t][1] for t in columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for target, row in self.cells.items():
            cells = []
            for test in columns:
                cell = row.get(test)
                cells.append(
                    "" if cell is None else f"{symbol[cell.outcome]} {cell.figure}".strip().replace("|", "\\|")
                )
            lines.append(f"| `{target}` | " + " | ".join(cells) + " |")
        details = [
            f"- `{target}` {INVARIANTS[test][1]}: {cell.outcome} {cell.figure} {cell.detail}".rstrip()
            for target, row in self.cells.items()
            for test, cell in row.items()
            if cell.outcome in ("FAIL", "err", "skip", "tie") or cell.detail
        ]
        if details:
            lines += ["", "### Failures, skips and notes", "", *details]
        if self.speedups:
            lines += ["", "### KV-cache speedup", "", *[f"- `{t}`: {s}" for t, s in self.speedups.items()]]
        lines += ["", "### Environment", ""]
        lines += [f"- {name}: {version}" for name, version in versions.items()]
        lines += [f"- device `{target}`: {name}" for target, name in self.devices.items() if name]
        lines += ["", "<details><summary>settings</summary>", "", *[f"- {s}" for s in settings], "", "</details>", ""]
        return "\n".join(lines)
