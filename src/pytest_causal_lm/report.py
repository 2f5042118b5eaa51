"""The verdict per checkpoint at a glance: a terminal table, Markdown and JSON reports.

Built from test reports only (outcome + user properties), so it works the same
under pytest-xdist, where reports travel from workers to the controller. Checks
record what they measured as data; it is formatted here, once.
"""

from __future__ import annotations

import json
import platform
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .benchmark import speedup_text
from .registry import Invariant, invariant_for_test, invariants

__all__ = ["Cell", "VerdictTable", "device_name", "library_versions", "merge_reports"]


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
    """A human name for a device: the GPU's name, or the CPU's model name."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device


@dataclass
class Cell:
    """One invariant on one target: outcome (ok, tie, FAIL, err, skip) and what was measured."""

    outcome: str
    figure: tuple[str, float] | None = None  # (label, value): ("Δ", 3e-5), ("KL mean", 0.002), ("tokens/step", 1)
    tolerance: dict[str, Any] | None = None  # atol, rtol, noise, noise_source
    position: int | None = None
    token_id: int | None = None
    detail: str = ""
    layer_nmse: list[list[Any]] | None = None  # [[layer, hidden-state NMSE], ...] of a failed reference comparison

    @classmethod
    def measured(cls, outcome: str, data: dict[str, Any], detail: str = "") -> Cell:
        """A cell from what a check recorded (CheckResult.as_dict(), or the data a failure carries)."""
        figure = data.get("figure")
        return cls(
            outcome,
            figure=(str(figure[0]), float(figure[1])) if figure else None,
            tolerance=data.get("tolerance"),
            position=data.get("position"),
            token_id=data.get("token_id"),
            detail=detail,
            layer_nmse=data.get("layer_nmse"),
        )

    @property
    def figure_text(self) -> str:
        if self.figure is None:
            return ""
        label, value = self.figure
        return f"{label} {value:.2g}" if isinstance(value, float) and not value.is_integer() else f"{label} {value:g}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """The cell a JSON report wrote (``to_dict``)."""
        figure = data.get("figure")
        return cls(
            data["outcome"],
            figure=(figure["label"], float(figure["value"])) if figure else None,
            tolerance=data.get("tolerance"),
            position=data.get("position"),
            token_id=data.get("token_id"),
            detail=data.get("detail", ""),
            layer_nmse=data.get("layer_nmse"),
        )

    def to_dict(self) -> dict[str, Any]:
        figure = {"label": self.figure[0], "value": self.figure[1]} if self.figure else None
        return {
            "outcome": self.outcome,
            "figure": figure,
            "tolerance": self.tolerance,
            "position": self.position,
            "token_id": self.token_id,
            "detail": self.detail,
            **({"layer_nmse": self.layer_nmse} if self.layer_nmse else {}),
        }


OUTCOME_LEGEND = (
    "ok=passed, tie=passed where two correct implementations may pick different tokens (top-two scores within "
    "the tolerance), FAIL=the check failed, err=error before the check ran (e.g. load), skip=not run (reason "
    "below), lim=a failure this project acknowledges (--causal-lm-known-limitations), -=not collected"
)


def _skip_reason(report: Any) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def _failure_title(report: Any) -> str:
    text = report.longreprtext
    first = next((line.strip() for line in text.splitlines() if line.strip().startswith("E ")), "")
    return first.removeprefix("E").strip().removeprefix("AssertionError:").strip() or text.strip().splitlines()[-1]


@dataclass
class VerdictTable:
    """Cells by target key (the full identity) and test name, filled from test reports."""

    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # target key -> unique display name
    devices: dict[str, str] = field(default_factory=dict)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # target key -> summary, diagnoses, cells
    load_errors: dict[str, str] = field(default_factory=dict)
    not_run: Counter[str] = field(default_factory=Counter)  # skip reasons of tests outside the invariants
    collected: dict[str, str] = field(default_factory=dict)  # nodeid -> target label, of every target's test
    reported: set[str] = field(default_factory=set)  # nodeids that got a report

    def add_report(self, report: Any) -> None:
        """Fold one pytest TestReport (setup, call or teardown) into the table."""
        properties = dict(report.user_properties)
        where = properties.get("causal_lm_cell")
        if not where:
            return
        self.reported.add(report.nodeid)
        target, test = where["target"], where["test"]
        if "causal_lm_load_error" in properties:
            self.load_errors[target] = properties["causal_lm_load_error"]
        if invariant_for_test(test) is None:
            if report.skipped:
                self.not_run[_skip_reason(report)] += 1
            return
        self.labels.setdefault(target, where.get("label", target))
        self.devices.setdefault(target, where.get("device", ""))
        row = self.cells.setdefault(target, {})
        data = properties.get("causal_lm") or {}
        if report.skipped and hasattr(report, "wasxfail"):  # an acknowledged known limitation that still fails
            row[test] = Cell.measured("lim", data, data.get("title") or report.wasxfail)
        elif report.skipped:
            row[test] = Cell("skip", detail=_skip_reason(report))
        elif report.failed:
            detail = data.get("title") or _failure_title(report)
            if "causal_lm_known_issue" in properties:
                detail = f"{detail} ({properties['causal_lm_known_issue']})"
            row[test] = Cell.measured("FAIL" if report.when == "call" else "err", data, detail)
        elif report.when == "call":
            row[test] = Cell.measured("tie" if data.get("near_tie") else "ok", data, "; ".join(data.get("notes") or []))

    def ran_anything(self) -> bool:
        return any(cell.outcome != "skip" for row in self.cells.values() for cell in row.values())

    def counts(self, target: str) -> dict[str, int]:
        return dict(Counter(cell.outcome for cell in self.cells[target].values()))

    def _columns(self) -> list[Invariant]:
        return [i for i in invariants() if any(i.test_name in row for row in self.cells.values())]

    def terminal_lines(self, verbosity: int) -> list[str]:
        """``-q``: a line per target; default: the table and failures; ``-v``: every figure too."""
        if verbosity < 0:
            return [f"{self.labels[t]}: {self._row_summary(t)}" for t in self.cells] + self._not_run_lines()
        if not self.ran_anything() and not self.load_errors:  # e.g. --benchmark-only: no table of skips
            benchmarks = [f"{self.labels[t]} benchmark {b['summary']}" for t, b in self.benchmarks.items()]
            return ["no invariant ran in this session", *benchmarks, *self._not_run_lines()]
        columns = self._columns()
        width = min(max(len("checkpoint-device-dtype"), *(len(label) for label in self.labels.values())), 40)
        lines = [f"{'checkpoint-device-dtype':<{width}} " + " ".join(f"{i.column:<4}" for i in columns)]
        for target, row in self.cells.items():
            label = self.labels[target]
            shown = label if len(label) <= width else label[: width - 1] + "~"
            outcomes = (row[i.test_name].outcome if i.test_name in row else "-" for i in columns)
            lines.append(f"{shown:<{width}} " + " ".join(f"{o:<4}" for o in outcomes))
        legend = "legend: " + ", ".join(f"{i.column}={i.name}" for i in columns) + "; " + OUTCOME_LEGEND
        lines.extend(textwrap.wrap(legend, width=100, subsequent_indent="        "))
        lines.extend(self._detail_lines(verbosity))
        return lines + self._not_run_lines()

    def _row_summary(self, target: str) -> str:
        if target in self.load_errors:
            return f"could not load: {self.load_errors[target]}"[:300]
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts(target).items()))

    def _detail_lines(self, verbosity: int) -> list[str]:
        lines = []
        for target, row in self.cells.items():
            label = self.labels[target]
            if target in self.load_errors:
                lines.append(f"  {label} could not load: {self.load_errors[target]}"[:300])
                continue
            for invariant in invariants():
                cell = row.get(invariant.test_name)
                if cell is None:
                    continue
                if cell.outcome in ("FAIL", "err", "tie", "lim") or (verbosity > 0 and (cell.figure or cell.detail)):
                    figure = f" {cell.figure_text}" if cell.figure else ""
                    detail = f": {cell.detail}" if cell.detail and (verbosity > 0 or cell.outcome != "tie") else ""
                    lines.append(f"  {label} {invariant.name} {cell.outcome}{figure}{detail}"[:300])
            if target in self.benchmarks:
                lines.append(f"  {label} benchmark {self.benchmarks[target]['summary']}")
        return lines

    def _not_run_lines(self) -> list[str]:
        """Every test that did not run and why, in one place (invariant skips, opt-in benchmarks)."""
        reasons: Counter[str] = Counter(self.not_run)
        for row in self.cells.values():
            for cell in row.values():
                if cell.outcome == "skip":
                    reasons[cell.detail] += 1
        never = Counter(label for nodeid, label in self.collected.items() if nodeid not in self.reported)
        if never:  # -x, --maxfail or an interrupt ended the session before these started
            targets = ", ".join(f"{label} ({n})" for label, n in never.items())
            reasons[f"never started: the session stopped early (-x, --maxfail or interrupted): {targets}"] = sum(
                never.values()
            )
        if not reasons:
            return []
        total = sum(reasons.values())
        return [f"not run: {total} test(s)"] + [f"  {n} x {reason}" for reason, n in reasons.most_common()]

    def to_json(self, versions: dict[str, str], settings: Any) -> str:
        """For machines: figures as numbers, settings with their sources, one entry per target key."""
        return json.dumps(
            {
                "versions": versions,
                "settings": {name: {"value": s.value, "source": s.source} for name, s in settings.values.items()},
                "targets": {
                    target: {
                        "label": self.labels[target],
                        "device_name": device_name(self.devices.get(target, "")),
                        "benchmark": self.benchmarks.get(target),
                        "load_error": self.load_errors.get(target),
                        "invariants": {
                            i.key: {"name": i.name, **row[i.test_name].to_dict()}
                            for i in invariants()
                            if i.test_name in row
                        },
                    }
                    for target, row in self.cells.items()
                },
                "not_run": dict(self.not_run),
            },
            indent=2,
            default=list,
        )

    def add_json_report(self, data: dict[str, Any]) -> None:
        """Fold the targets of a JSON report (``to_json``) in, keyed on their full identity: a target that an
        earlier report holds too gets its cells merged, the later report's cell winning per invariant."""
        for target, entry in data["targets"].items():
            self.labels.setdefault(target, entry["label"])
            self.devices.setdefault(target, entry.get("device_name", ""))
            row = self.cells.setdefault(target, {})
            row.update({f"test_{key}": Cell.from_dict(cell) for key, cell in entry["invariants"].items()})
            if entry.get("benchmark"):
                self.benchmarks[target] = entry["benchmark"]
            if entry.get("load_error"):
                self.load_errors[target] = entry["load_error"]
        self.not_run.update(data.get("not_run", {}))

    def relabel(self) -> None:
        """Unique display names over every target, as one run over all of them would give."""
        from .targets import Target, with_unique_labels

        targets = [Target.from_key(key) for key in self.cells]
        self.labels = {t.key: t.label for t in with_unique_labels(targets)}

    def to_markdown(self, versions: dict[str, str], settings: list[str], layer_image: str | None = None) -> str:
        """A line per target first, then what failed, then skips and notes, then every cell by family (folded):
        36+ invariants read at a glance only as rows, never as columns. ``layer_image``: the per-layer error plot
        (``draw_layer_errors``) drawn beside the report, shown under the failures."""
        lines = ["## causal-lm verdict", "", *self._markdown_summary()]
        failures = self._markdown_details(_FAILING)
        if failures:
            lines += ["", "### Failures", "", *failures]
        if layer_image:
            lines += ["", f"![hidden-state NMSE per layer against the reference]({layer_image})"]
        notes = self._markdown_details(("tie", "skip", "ok"))
        if notes:
            lines += ["", "### Skips and notes", "", *notes]
        if self.cells:
            lines += ["", "<details><summary>every invariant, by family</summary>", "", *self._markdown_by_family()]
            lines += ["", "</details>"]
        for target, bench in self.benchmarks.items():
            lines += ["", f"### Generation benchmark: `{self.labels[target]}`", "", *_benchmark_markdown(bench)]
        lines += ["", "### Environment", ""]
        lines += [f"- {name}: {version}" for name, version in versions.items()]
        lines += [f"- device of `{self.labels[t]}`: {_device_text(d)}" for t, d in self.devices.items() if d]
        lines += ["", "<details><summary>settings</summary>", "", *[f"- {s}" for s in settings], "", "</details>", ""]
        return "\n".join(lines)

    def failing_layer_errors(self) -> dict[str, list[list[Any]]]:
        """Per target label, the per-layer hidden-state NMSE of its failed reference comparison."""
        return {
            self.labels[target]: cell.layer_nmse
            for target, row in self.cells.items()
            for cell in row.values()
            if cell.layer_nmse and cell.outcome in _FAILING
        }

    def _markdown_summary(self) -> list[str]:
        lines = [
            "| checkpoint-device-dtype | verdict | passed | failed | skipped | failing invariants |",
            "|---" * 6 + "|",
        ]
        for target, row in self.cells.items():
            counts = Counter(cell.outcome for cell in row.values())
            failing = [i.name for i in invariants() if i.test_name in row and row[i.test_name].outcome in _FAILING]
            if target in self.load_errors:
                verdict, failing = "❌ could not load", ["(load)", *failing]
            elif counts["FAIL"] or counts["err"]:
                verdict = "❌ FAIL"
            else:
                verdict = "⚠ pass with known limitations" if counts["lim"] else "✅ pass"
            passed, failed = counts["ok"] + counts["tie"], counts["FAIL"] + counts["err"] + counts["lim"]
            cells = [f"`{self.labels[target]}`", verdict, str(passed), str(failed), str(counts["skip"])]
            lines.append("| " + " | ".join([*cells, ", ".join(failing).replace("|", "\\|")]) + " |")
        return lines

    def _markdown_details(self, outcomes: tuple[str, ...]) -> list[str]:
        """A bullet per cell with one of ``outcomes`` (ok cells only when they carry a note), in report order."""
        lines = [f"- `{self.labels[t]}` could not load: {error}" for t, error in self.load_errors.items()]
        if "FAIL" not in outcomes:
            lines = []
        for target, row in self.cells.items():
            for invariant in invariants():
                cell = row.get(invariant.test_name)
                if cell is None or cell.outcome not in outcomes or (cell.outcome == "ok" and not cell.detail):
                    continue
                text = f"{_SYMBOL[cell.outcome]} {cell.figure_text}".strip() + (
                    f": {cell.detail}" if cell.detail else ""
                )
                lines.append(f"- `{self.labels[target]}` {invariant.name}: {text}")
                if cell.layer_nmse and cell.outcome in _FAILING:
                    lines += ["", *layer_plot(cell.layer_nmse), ""]
        return lines

    def _markdown_by_family(self) -> list[str]:
        targets = list(self.cells)
        lines = ["| family | invariant | " + " | ".join(f"`{self.labels[t]}`" for t in targets) + " |"]
        lines.append("|---" * (len(targets) + 2) + "|")
        shown_family = None
        for invariant in sorted(self._columns(), key=lambda i: _family_order(i.marker)):
            family = invariant.marker if invariant.marker != shown_family else ""
            shown_family = invariant.marker
            cells = []
            for target in targets:
                cell = self.cells[target].get(invariant.test_name)
                cells.append("" if cell is None else f"{_SYMBOL[cell.outcome]} {cell.figure_text}".strip())
            lines.append(f"| {family} | {invariant.name} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return lines


_FAILING = ("FAIL", "err", "lim")
_SYMBOL = {
    "ok": "✅ pass",
    "tie": "✅ pass (near-tie)",
    "FAIL": "❌ FAIL",
    "err": "❌ error",
    "skip": "⏭ skip",
    "lim": "⚠ known limitation",
}


def draw_layer_errors(errors: dict[str, list[list[Any]]], path: Path) -> Path | None:
    """The per-layer hidden-state NMSE of each failing target, one line each on a log scale, as a PNG at
    ``path``; None without matplotlib (the Markdown keeps its text chart) or without a failing table."""
    if not errors:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(10, 4))
    for label, rows in errors.items():
        axis.plot(
            [str(name) for name, _ in rows], [max(float(value), 1e-12) for _, value in rows], marker="o", label=label
        )
    axis.set_yscale("log")
    axis.set_ylabel("hidden-state NMSE vs the reference")
    axis.tick_params(axis="x", labelrotation=90)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def layer_plot(errors: list[list[Any]], width: int = 40) -> list[str]:
    """The hidden-state NMSE per layer as a bar chart on a log scale (1e-8 to 1) in a fenced block: where the
    error jumps reads at a glance in any Markdown viewer, with no image to ship beside the report."""
    import math

    names = [str(name) for name, _ in errors]
    pad = max(len(name) for name in names)
    lines = ["```text", f"{'layer'.ljust(pad)}  NMSE       log10: -8 {'.' * (width - 12)} 0"]
    for name, value in errors:
        bar = round(width * (min(max(math.log10(value), -8.0), 0.0) + 8) / 8) if value > 0 else 0
        lines.append(f"{name.ljust(pad)}  {value:<9.3g}  |{'█' * bar}")
    return [*lines, "```"]


def _family_order(marker: str) -> int:
    """Families in the order their first invariant is registered (report order)."""
    return next(n for n, i in enumerate(invariants()) if i.marker == marker)


def _device_text(device: str) -> str:
    """A device as a run names it (``cpu``), or as a JSON report already wrote it (its hardware name)."""
    return device_name(device) if device in ("cpu", "cuda", "mps", "xpu") or ":" in device else device


_BENCHMARK_COLUMNS = (
    ("mode", "mode", "{}"),
    ("prompt", "prompt_length", "{}"),
    ("new", "new_tokens", "{}"),
    ("TTFT ms", "ttft_seconds", "{:.1f}", 1e3),
    ("ITL p50 ms", "itl_p50_seconds", "{:.2f}", 1e3),
    ("p90", "itl_p90_seconds", "{:.2f}", 1e3),
    ("p99", "itl_p99_seconds", "{:.2f}", 1e3),
    ("tok/s", "tokens_per_second", "{:.1f}"),
    ("speedup vs no_cache (min-max)", "speedup", ""),
    ("total s (min-max)", None, ""),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("MBU", "memory_bandwidth_utilisation", "{:.1%}"),
    ("bound", "bound", "{}"),
)


def _benchmark_cell(figures: dict[str, Any], key: str | None, pattern: str, scale: float = 1.0) -> str:
    if key is None:
        total = f"{figures['median_seconds']:.3g} ({figures['min_seconds']:.3g}-{figures['max_seconds']:.3g})"
        return total + (" unstable" if figures.get("unstable") else "")
    if key == "speedup":
        return speedup_text(figures)
    value = figures.get(key)
    if value is None:
        return "-"
    return pattern.format(value * scale if isinstance(value, float) and scale != 1.0 else value)


def _benchmark_markdown(bench: dict[str, Any]) -> list[str]:
    """The benchmark's cells as a Markdown table, then its diagnoses."""
    lines = ["| " + " | ".join(c[0] for c in _BENCHMARK_COLUMNS) + " |", "|---" * len(_BENCHMARK_COLUMNS) + "|"]
    for figures in bench["cells"]:
        lines.append("| " + " | ".join(_benchmark_cell(figures, *c[1:]) for c in _BENCHMARK_COLUMNS) + " |")
    return [*lines, "", *[f"- {line}" for line in [*bench["diagnoses"], *bench.get("notes", [])]]]


def merge_reports(paths: list[str]) -> tuple[VerdictTable, dict[str, str], list[str]]:
    """One verdict from the JSON reports of several runs (CI jobs, each a slice of the checkpoints): the table,
    the library versions (per report where they differ) and each report's settings that were not defaults."""
    table = VerdictTable()
    versions: dict[str, list[str]] = {}
    settings: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        table.add_json_report(data)
        for name, version in data.get("versions", {}).items():
            versions.setdefault(name, [])
            if version not in versions[name]:
                versions[name].append(version)
        settings += [
            f"{path}: {name}={value['value']} ({value['source']})"
            for name, value in data.get("settings", {}).items()
            if value.get("source") != "default"
        ]
    table.relabel()
    return table, {name: ", ".join(found) for name, found in versions.items()}, settings


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_causal_lm merge r1.json r2.json ...``: print (or write) the merged verdict;
    exit 1 when any target failed or could not load, so a CI merge job fails with the run."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m pytest_causal_lm")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge JSON reports (--causal-lm-report=r.json) into one verdict")
    merge.add_argument("reports", nargs="+", metavar="REPORT.json")
    merge.add_argument("--output", help="write the merged verdict here (.md or .json) instead of printing it")
    merge.add_argument("--github-summary", action="store_true", help="append the Markdown to $GITHUB_STEP_SUMMARY")
    args = parser.parse_args(argv)
    try:
        table, versions, settings = merge_reports(args.reports)
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot merge: {type(exc).__name__}: {exc} (pass JSON reports written by --causal-lm-report=r.json)")
        return 2
    markdown = table.to_markdown(versions, [f"merged from {len(args.reports)} reports", *settings])
    if args.output:
        as_json = args.output.endswith(".json")
        text = _merged_json(table, versions) if as_json else markdown
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(markdown)
    if args.github_summary and os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
            handle.write(markdown + "\n")
    failed = any(c.outcome in ("FAIL", "err") for row in table.cells.values() for c in row.values())
    return 1 if failed or table.load_errors else 0


def _merged_json(table: VerdictTable, versions: dict[str, str]) -> str:
    from types import SimpleNamespace

    return table.to_json(versions, SimpleNamespace(values={}))
