"""What the plugin writes: the benchmark and verdict sections of the terminal summary, the report files and
the context line under a failing test. The verdict's content is ``report.py``'s; this module only places it.

Registered by ``plugin.py`` (``pytest_plugins``). Imports no torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .session import CausalLMSession, has_session, session_of
from .targets import Target


def failure_context(config: pytest.Config, target: Target) -> str:
    """One line: what was tested, with which seed and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"checkpoint {target.checkpoint}, revision {target.revision or 'default'}, device {target.device}, "
        f"dtype {target.dtype}, seed {session_of(config).settings.seed}, "
        f"torch {installed('torch')}, transformers {installed('transformers')}"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    _benchmark_summary(terminalreporter, config)
    _verdict_summary(terminalreporter, config)


def _verdict_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not has_session(config):
        return
    session = session_of(config)
    table = session.verdict
    if not table.cells:
        return
    for key in session.benchmarks.targets():
        table.benchmarks[key] = {
            "summary": session.benchmarks.summary(key),
            "diagnoses": session.benchmarks.diagnoses(key),
            "cells": session.benchmarks.report_cells(key),
            "notes": session.benchmarks.notes(key),
        }
    terminalreporter.section("causal-lm verdict")
    for line in table.terminal_lines(config.get_verbosity()):
        terminalreporter.write_line(line)
    _write_reports(terminalreporter, session)


def _write_reports(terminalreporter: pytest.TerminalReporter, session: CausalLMSession) -> None:
    from .report import draw_layer_errors, library_versions

    settings = session.settings
    if not settings.report and not settings.github_summary:
        return
    table = session.verdict
    if not table.ran_anything():  # e.g. --benchmark-only: keep the report of the last run that ran the suite
        terminalreporter.write_line("causal-lm: no invariant ran in this session; the report was left as it was")
        return
    versions = library_versions()
    if settings.report:
        path = Path(settings.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        as_json = path.suffix == ".json"
        image = None if as_json else draw_layer_errors(table.failing_layer_errors(), path.with_suffix(".layers.png"))
        text = (
            table.to_json(versions, settings)
            if as_json
            else table.to_markdown(versions, settings.describe(), image.name if image else None)
        )
        path.write_text(text, encoding="utf-8")
        terminalreporter.write_line(f"causal-lm report written to {path}")
    if settings.github_summary:
        import os

        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(table.to_markdown(versions, settings.describe()) + "\n")
            terminalreporter.write_line(f"causal-lm verdict appended to {summary}")
        else:
            terminalreporter.write_line("causal-lm: GITHUB_STEP_SUMMARY is not set; no job summary written")


def _benchmark_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not has_session(config):
        return
    session = session_of(config)
    collector = session.benchmarks
    if not collector.measurements:
        return
    terminalreporter.section("causal-lm benchmark: forced greedy generation (medians; ITL = inter-token latency)")
    for key in collector.targets():
        terminalreporter.write_line(collector.labels[key])
        for line in [*collector.table(key), *collector.diagnoses(key)]:
            terminalreporter.write_line("  " + line)
    plot = collector.plot(Path(session.settings.benchmark_plot))
    if plot is None:
        terminalreporter.write_line("plot skipped: pip install matplotlib to draw tokens/s per mode")
    else:
        terminalreporter.write_line(f"plot of tokens/s vs new tokens and vs prompt length: {plot}")
