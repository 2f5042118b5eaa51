"""The pytest11 entry point: options, ini keys, markers, report header, fixtures, built-in suite.

Imports neither torch nor transformers: projects that have the plugin
installed but never configure a checkpoint pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .invariants import invariant_for_test, invariants, show_registry_frames
from .invariants import markers as invariant_markers
from .loading import CausalLM, CheckpointLoadError, Target, with_unique_labels
from .session import CausalLMSession, has_session, session_of, start_session
from .settings import OPTIONS, Settings, resolve_settings

SUITE_DIR = Path(__file__).parent / "suite"
BENCHMARK_MODULE = "test_causal_lm_benchmark.py"

# Markers besides the invariants' own (those come from the registry).
MARKERS = {
    "causal_lm": "a test of the built-in causal LM invariant suite",
    "causal_lm_benchmark": "generation benchmark: no cache, dynamic, static and compiled caches (opt-in: --causal-lm-benchmark)",
}

HOW_TO_CONFIGURE = (
    "pass --causal-lm-checkpoint=CKPT (e.g. tiny:qwen3), "
    "set CAUSAL_LM_CHECKPOINT, or add causal_lm_checkpoint to [tool.pytest.ini_options]"
)
NO_CHECKPOINT_REASON = "no causal LM checkpoint configured: " + HOW_TO_CONFIGURE


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("causal-lm", "causal language model invariants (pytest-causal-lm)")
    for spec in OPTIONS:
        env_note = f" [env {spec.env}, ini {spec.ini}]"
        if spec.flag:
            group.addoption(spec.option, action="store_true", default=None, dest=spec.dest, help=spec.help + env_note)
        elif spec.multiple:
            group.addoption(
                spec.option,
                action="append",
                default=None,
                dest=spec.dest,
                metavar=spec.metavar,
                help=spec.help + env_note,
            )
        else:
            group.addoption(spec.option, default=None, dest=spec.dest, choices=spec.choices, help=spec.help + env_note)
        parser.addini(spec.ini, help=spec.help, type=spec.ini_type, default=[] if spec.multiple else None)


@pytest.hookimpl(trylast=True)  # after conftests' own pytest_configure, which may register invariants
def pytest_configure(config: pytest.Config) -> None:
    for name, description in {**MARKERS, **invariant_markers()}.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    settings = resolve_settings(config)
    show_registry_frames(config.getoption("tbstyle", "auto") == "long")
    session = start_session(config, settings)
    config.pluginmanager.register(_VerdictListener(session), "causal-lm-verdict")
    if settings.report and not settings.report.endswith((".md", ".json")):
        raise pytest.UsageError(f"--causal-lm-report: {settings.report!r} must end in .md or .json")
    unknown = set(settings.known_limitations) - {i.key for i in invariants()}
    if unknown:
        raise pytest.UsageError(
            f"--causal-lm-known-limitations: no invariant {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(i.key for i in invariants())}"
        )
    if settings.checkpoint:
        _require_named_devices(settings)
    elif settings.require_checkpoint:
        raise pytest.UsageError(f"--causal-lm-require-checkpoint: no checkpoint configured; {HOW_TO_CONFIGURE}")
    _check_marker_expression(config)
    if session.benchmarks_enabled() and _under_xdist(config):
        raise pytest.UsageError(
            "--causal-lm-benchmark under pytest-xdist (-n): pytest-benchmark turns timing off in xdist workers, "
            "so nothing would be measured. Run the benchmark without -n (e.g. -p no:xdist)"
        )
    if settings.checkpoint and settings.suite == "only":
        config.args[:] = [str(SUITE_DIR)]
    elif settings.checkpoint and settings.suite == "on" and str(SUITE_DIR) not in config.args:
        config.args.append(str(SUITE_DIR))


def _check_marker_expression(config: pytest.Config) -> None:
    """``-m causal_lm_typo`` would select nothing and exit 5 without a word: name the real markers."""
    import re

    known = {*MARKERS, *invariant_markers()}
    for name in re.findall(r"\bcausal_lm\w*", config.getoption("markexpr", "") or ""):
        if name not in known:
            raise pytest.UsageError(f"-m {name}: no such marker; the causal-lm markers are {', '.join(sorted(known))}")


def _under_xdist(config: pytest.Config) -> bool:
    return bool(config.getoption("numprocesses", None)) or config.getoption("dist", "no") != "no"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The benchmark module is collected only when benchmarks are asked for (no row of skips otherwise)."""
    if collection_path.name == BENCHMARK_MODULE and collection_path.parent == SUITE_DIR:
        return None if session_of(config).benchmarks_enabled() else True
    return None


def _require_named_devices(settings: Settings) -> None:
    """A device asked for by name that this machine lacks is a usage error: a run must not go green untested."""
    from .devices import unavailable_reason

    if settings.device_map:
        return
    for device in dict.fromkeys(settings.device):
        reason = None if device == "auto" else unavailable_reason(device)
        if reason:
            raise pytest.UsageError(f"--causal-lm-device={device}: {reason}. Use --causal-lm-device=auto to fall back")


def _target_of(item: pytest.Item) -> Target | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("causal_lm_target") if callspec is not None else None


@pytest.hookimpl(trylast=True)  # after other plugins have reordered: this is the order tests run in
def pytest_collection_finish(session: pytest.Session) -> None:
    last: dict[Target, str] = {}
    verdict = session_of(session.config).verdict
    for item in session.items:
        target = _target_of(item)
        if target is not None:
            last[target] = item.nodeid
            verdict.collected[item.nodeid] = target.id
    session_of(session.config).last_test_of = {nodeid: target for target, nodeid in last.items()}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A target whose load failed was reported once, at its first test; its other tests say where, and skip."""
    target = _target_of(item)
    if target is None:
        return
    session = session_of(item.config)
    session.current_item = item
    shown_at = session.load_failure_shown_at.get(target)
    if shown_at is not None:
        pytest.skip(f"{target.id} could not load (reported once, at {shown_at.split('::')[-1]})")


@pytest.hookimpl(trylast=True)  # after the runner's teardown, so only the cache still holds the model
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Release a model after the last test that uses it, so a run over many checkpoints holds one at a time."""
    session = session_of(item.config)
    target = session.last_test_of.get(item.nodeid)
    if target is not None and (nextitem is None or _target_of(nextitem) != target):
        session.models.release(target)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    session = session_of(config)
    skip = pytest.mark.skip(reason="benchmarks are opt-in: pass --causal-lm-benchmark (or --benchmark-only)")
    for item in items:
        target = _target_of(item)
        if target is not None:  # tags the reports so the verdict table can be built from them alone
            test = getattr(item, "originalname", item.name)
            cell = {"target": target.key, "label": target.id, "test": test, "device": target.device}
            item.user_properties.append(("causal_lm_cell", cell))
        if item.get_closest_marker("causal_lm_benchmark") and not session.benchmarks_enabled():
            item.add_marker(skip)
        invariant = invariant_for_test(getattr(item, "originalname", item.name))
        if invariant is None or not item.get_closest_marker("causal_lm"):
            continue
        reason = invariant.opt_in(config) if invariant.opt_in else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif invariant.key in session.settings.known_limitations:
            why = "a known limitation this project acknowledges (causal_lm_known_limitations)"
            item.add_marker(pytest.mark.xfail(reason=why, strict=True))


class _VerdictListener:
    """Feeds every test report to the session's verdict table (on the xdist controller too)."""

    def __init__(self, session: CausalLMSession) -> None:
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.session.verdict.add_report(report)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call" and report.passed:
        session_of(item.config).passed_items.append(item)
    target = _target_of(item)
    if report.failed and target is not None:
        report.sections.append(("causal-lm", _failure_context(item.config, target)))
    return report


def _failure_context(config: pytest.Config, target: Target) -> str:
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
    from .report import library_versions

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
        text = table.to_json(versions, settings) if as_json else table.to_markdown(versions, settings.describe())
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


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Main settings and those not at their default; every setting with -vv."""
    if not has_session(config):
        return []
    settings = session_of(config).settings
    return ["causal-lm: " + ", ".join(settings.describe(everything=config.get_verbosity() > 1))]


def targets_of(settings: Settings) -> list[Target]:
    """Every checkpoint x device combination to test, ``auto`` devices resolved, each with a unique label."""
    from .devices import resolve_device

    devices = ["cpu"] if settings.device_map else list(dict.fromkeys(resolve_device(d) for d in settings.device))
    targets = [
        Target(
            checkpoint=checkpoint,
            device=device,
            dtype=settings.dtype,
            revision=settings.revision,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
            device_map=settings.device_map,
            max_memory=settings.max_memory if settings.device_map else None,
        )
        for checkpoint in dict.fromkeys(settings.checkpoint)
        for device in devices
    ]
    return with_unique_labels(targets)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = session_of(metafunc.config).settings
    if "causal_lm_benchmark_case" in metafunc.fixturenames:
        from .benchmark import benchmark_cases

        devices = [t.device for t in targets_of(settings)] if settings.checkpoint else ["cpu"]
        cases = benchmark_cases(settings, devices)
        metafunc.parametrize("causal_lm_benchmark_case", cases, ids=[c.id for c in cases])
    if "causal_lm_target" not in metafunc.fixturenames:
        return
    if not settings.checkpoint:
        return  # the fixture skips with NO_CHECKPOINT_REASON
    targets = targets_of(settings)
    metafunc.parametrize("causal_lm_target", targets, ids=[t.id for t in targets], indirect=True, scope="session")


@pytest.fixture(scope="session")
def causal_lm_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved plugin settings (option > env > ini > default) of this session."""
    return session_of(request.config).settings


@pytest.fixture(scope="session")
def causal_lm_target(request: pytest.FixtureRequest) -> Target:
    """The checkpoint/device/dtype under test; parametrised from the settings. Override in a conftest."""
    from .devices import unavailable_reason

    target = getattr(request, "param", None)
    if target is None:
        pytest.skip(NO_CHECKPOINT_REASON)
    reason = unavailable_reason(target.device)
    if reason:  # only a target built in a conftest gets here: named devices are checked at start-up
        pytest.fail(reason, pytrace=False)
    return target


@pytest.fixture(scope="session")
def causal_lm(request: pytest.FixtureRequest, causal_lm_target: Target) -> Iterator[CausalLM]:
    """The loaded checkpoint: model, tokenizer, tolerance, target. Loaded once per session.

    A checkpoint that cannot load fails the first test that needs it, with the one-line cause;
    its other tests skip, pointing there.
    """
    session = session_of(request.config)
    try:
        with _load_progress(request.config, causal_lm_target, session):
            handle = session.models.get(causal_lm_target)
    except CheckpointLoadError as exc:
        problem = str(exc)
    else:
        problem = None
    if problem is not None:  # failed outside the except block so no chained exception is printed
        item = session.current_item
        if item is not None:  # the report carries the cause to the verdict (under xdist too)
            session.load_failure_shown_at[causal_lm_target] = item.nodeid
            item.user_properties.append(("causal_lm_load_error", problem))
        pytest.fail(f"cannot load {causal_lm_target.checkpoint}: {problem}", pytrace=False)
    yield handle


# Checkpoints smaller than this load in about a second: no progress line for them.
PROGRESS_MIN_BYTES = 50_000_000


@contextmanager
def _load_progress(config: pytest.Config, target: Target, session: CausalLMSession) -> Iterator[None]:
    """Say on the terminal what is loading, how big it is and how long it took (setup output is captured)."""
    import time

    from .loading import weights_size

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    size = weights_size(target.checkpoint)
    if reporter is None or target in session.models.loaded or (size is not None and size < PROGRESS_MIN_BYTES):
        yield
        return

    def say(line: str) -> None:
        if capture is None:
            reporter.write_line(line)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    shown = "size unknown" if size is None else f"{size / 1e9:.2f} GB"
    say(f"causal-lm: loading {target.checkpoint} ({shown}) on {target.device_map or target.device} ...")
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        say(f"causal-lm: {target.id}: load failed after {time.perf_counter() - start:.1f} s")
        raise
    say(f"causal-lm: {target.id}: loaded in {time.perf_counter() - start:.1f} s")


@pytest.fixture
def causal_lm_snapshot(request: pytest.FixtureRequest, snapshot: Any) -> Any:
    """syrupy's ``snapshot`` with the causal-lm extension: ``assert causal_lm_snapshot == behaviour_record(...)``."""
    return snapshot.use_extension(session_of(request.config).snapshot_extension())


@pytest.fixture(scope="session")
def causal_lm_reference(request: pytest.FixtureRequest, causal_lm_target: Target) -> Any:
    """The reference checkpoint's outputs on the candidate's device, computed once; the reference model is freed.

    Request it before ``causal_lm`` so the reference is gone before the candidate loads.
    """
    session = session_of(request.config)
    settings = session.settings
    if not settings.reference:
        pytest.skip("no reference configured: pass --causal-lm-reference=CKPT to compare checkpoints with it")
    device = causal_lm_target.device
    if device not in session.references:
        session.references[device] = _compute_reference(session, device)
    if isinstance(session.references[device], str):
        pytest.fail(session.references[device], pytrace=False)
    return session.references[device]


def _compute_reference(session: CausalLMSession, device: str) -> Any:
    """The reference's outputs on ``device``, or why it could not load; the reference model is freed after."""
    import gc

    from .checks.reference import reference_outputs
    from .loading import load

    settings = session.settings
    target = Target(
        checkpoint=settings.reference,
        device=device,
        dtype=settings.reference_dtype,
        attn_implementation=settings.attn_implementation,
        trust_remote_code=settings.trust_remote_code,
    )
    try:
        handle = load(target, seed=settings.seed)
    except CheckpointLoadError as exc:
        return f"cannot load the reference {settings.reference}: {exc}"
    outputs = reference_outputs(handle.model, handle.tokenizer, prompts=_reference_prompts(session))
    del handle
    gc.collect()
    return outputs


def _reference_prompts(session: CausalLMSession) -> list[str]:
    import json

    from .checks.reference import REFERENCE_PROMPTS

    path = session.settings.reference_prompts
    if not path:
        return list(REFERENCE_PROMPTS)
    text = Path(path).read_text(encoding="utf-8")
    prompts = json.loads(text) if path.endswith(".json") else [line for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise pytest.UsageError(
            f"--causal-lm-reference-prompts: {path} holds no prompts (one per line, or a JSON list)"
        )
    return prompts


@pytest.fixture(scope="session")
def causal_lm_model(causal_lm: CausalLM) -> object:
    """The model under test (``AutoModelForCausalLM``), in eval mode with gradients off."""
    return causal_lm.model


@pytest.fixture(scope="session")
def causal_lm_tokenizer(causal_lm: CausalLM) -> object:
    """The tokenizer of the checkpoint under test."""
    return causal_lm.tokenizer
