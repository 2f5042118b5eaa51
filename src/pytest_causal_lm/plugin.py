"""The pytest11 entry point, hooks only: options, ini keys, markers, report header, collection of the
built-in suite, the verdict's feed. Fixtures live in ``fixtures.py`` and the terminal and report output in
``output.py``, both registered from here.

Imports neither torch nor transformers: projects that have the plugin
installed but never configure a checkpoint pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .output import failure_context
from .registry import invariant_for_test, invariants, show_registry_frames
from .registry import markers as invariant_markers
from .session import CausalLMSession, has_session, session_of, start_session
from .settings import HOW_TO_CONFIGURE, OPTIONS, Settings, closest, resolve_settings
from .targets import Target, targets_of

pytest_plugins = ["pytest_causal_lm.fixtures", "pytest_causal_lm.output"]

SUITE_DIR = Path(__file__).parent / "suite"
BENCHMARK_MODULE = "test_causal_lm_benchmark.py"

# Markers besides the invariants' own (those come from the registry).
MARKERS = {
    "causal_lm": "a test of the built-in causal LM invariant suite",
    "causal_lm_benchmark": "generation benchmark: no cache, dynamic, static and compiled caches (opt-in: --causal-lm-benchmark)",
}


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
    if settings.equivalence_examples:
        _require_hypothesis()
    if settings.checkpoint:
        _require_named_devices(settings)
    elif settings.require_checkpoint:
        raise pytest.UsageError(f"--causal-lm-require-checkpoint: no checkpoint configured; {HOW_TO_CONFIGURE}")
    _check_marker_expression(config)
    if settings.checkpoint and settings.suite == "only":
        config.args[:] = [str(SUITE_DIR)]
    elif settings.checkpoint and settings.suite == "on" and str(SUITE_DIR) not in config.args:
        config.args.append(str(SUITE_DIR))
        session.suite_hidden_under = _hidden_root(config)


def _require_hypothesis() -> None:
    from .checks.equivalence import hypothesis_missing  # here: the engine's module is not imported otherwise

    missing = hypothesis_missing()
    if missing:
        raise pytest.UsageError(f"--causal-lm-equivalence-examples: {missing}")


def _hidden_root(config: pytest.Config) -> Path | None:
    """The topmost directory above the suite, inside the rootdir, that pytest skips when it recurses (a virtual
    environment, a dot- or ``venv`` directory: uv's and poetry's ``./.venv``), or None.

    pytest folds an argument inside another one (the suite inside the repository) into the recursion, so the
    suite installed in ``./.venv`` would be skipped with the environment: inside that directory only the way
    down to the suite is collected, and nothing else of the environment.
    """
    from fnmatch import fnmatch

    patterns = config.getini("norecursedirs")
    for directory in reversed(SUITE_DIR.parents):  # from the filesystem's root down
        if config.rootpath not in directory.parents:
            continue
        is_environment = (directory / "pyvenv.cfg").is_file() or (directory / "conda-meta" / "history").is_file()
        if is_environment or any(fnmatch(directory.name, pattern) for pattern in patterns):
            return directory
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own configure, which refuses the same with its words
def pytest_cmdline_main(config: pytest.Config) -> None:
    benchmark = config.getoption("benchmark_only", False) or resolve_settings(config).benchmark
    if benchmark and _under_xdist(config):
        raise pytest.UsageError(
            "the generation benchmark (--causal-lm-benchmark or --benchmark-only) under pytest-xdist (-n): "
            "pytest-benchmark turns timing off in xdist workers, so nothing would be measured. Run the benchmark "
            "without -n (e.g. -p no:xdist)"
        )


def _check_marker_expression(config: pytest.Config) -> None:
    """``-m causal_lm_typo`` would select nothing and exit 5 without a word: name the real markers."""
    import re

    known = {*MARKERS, *invariant_markers()}
    for name in re.findall(r"\bcausal_lm\w*", config.getoption("markexpr", "") or ""):
        if name not in known:
            raise pytest.UsageError(
                f"-m {name}: no such marker{closest(name, sorted(known), '')} (pytest --markers lists them)"
            )


def _under_xdist(config: pytest.Config) -> bool:
    return bool(config.getoption("numprocesses", None)) or config.getoption("dist", "no") != "no"


@pytest.hookimpl(tryfirst=True)  # first: its answer inside a hidden environment overrides pytest's own
def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The benchmark module is collected only when benchmarks are asked for (no row of skips otherwise); inside
    an environment pytest would skip (``_hidden_root``), only the way down to the suite."""
    session = session_of(config)
    if collection_path.name == BENCHMARK_MODULE and collection_path.parent == SUITE_DIR:
        return None if session.benchmarks_enabled() else True
    hidden = session.suite_hidden_under
    if hidden is None or (collection_path != hidden and hidden not in collection_path.parents):
        return None
    if collection_path == SUITE_DIR or SUITE_DIR in collection_path.parents:
        return None  # the suite's own files: pytest's rules as anywhere else
    return collection_path not in SUITE_DIR.parents


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


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.path.parent == SUITE_DIR:
        session_of(item.config).suite_items += 1


@pytest.hookimpl(tryfirst=True)  # before -k, -m and --lf deselect: those may select nothing on purpose
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """A run configured to test a checkpoint whose built-in suite collected nothing fails, saying so: it must not
    go green having tested nothing."""
    state = session_of(config)
    if (
        state.settings.checkpoint
        and state.settings.suite != "off"
        and not state.suite_items
        and not session.testsfailed
    ):
        raise pytest.UsageError(_suite_not_collected(state.settings))
    _prepare_items(config, items)


def _suite_not_collected(settings: Settings) -> str:
    return (
        f"the built-in suite (suite={settings.suite}) collected no test from {SUITE_DIR} for "
        f"{', '.join(settings.checkpoint)}: nothing of the checkpoint would be tested. pytest's collection left "
        "it out (an --ignore-glob or a plugin's pytest_ignore_collect matching it?); run with "
        "--causal-lm-suite=only to test the checkpoint alone"
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under pytest-xdist the workers collect: a controller whose workers collected nothing says why, and fails."""
    settings = session_of(session.config).settings
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and settings.checkpoint and settings.suite != "off":
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"ERROR: {_suite_not_collected(settings)}", red=True)
        session.exitstatus = pytest.ExitCode.USAGE_ERROR


def _prepare_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tag each target's tests for the verdict, and skip the opt-in ones that are off (xfail acknowledged ones)."""
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
        reason = invariant.opt_in(session) if invariant.opt_in else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif invariant.key in session.settings.known_limitations:
            why = "a known limitation this project acknowledges (causal_lm_known_limitations)"
            item.add_marker(pytest.mark.xfail(reason=why, strict=True))


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
        known = _known_discrepancy(item, report)
        if known:
            report.user_properties.append(("causal_lm_known_issue", known))
        context = failure_context(item.config, target)
        report.sections.append(("causal-lm", f"{context}\n{known}" if known else context))
    return report


def _known_discrepancy(item: pytest.Item, report: pytest.TestReport) -> str | None:
    """What the suite knows when this failure is one of transformers itself (``known_issues``), or None."""
    import transformers

    from .known_issues import known_discrepancy

    invariant = invariant_for_test(getattr(item, "originalname", item.name))
    causal_lm = getattr(item, "funcargs", {}).get("causal_lm")
    if invariant is None or causal_lm is None or report.when != "call":
        return None
    model_type = getattr(causal_lm.model.config, "model_type", "")
    version = transformers.__version__
    known = known_discrepancy(model_type, invariant.key, report.longreprtext, version)
    if known is None:
        return None
    return (
        f"a transformers bug or design, not your checkpoint ({model_type} on transformers {version}): {known.why}. "
        f"Acknowledge it with --causal-lm-known-limitations={invariant.key}"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Main settings and those not at their default; every setting with -vv."""
    if not has_session(config):
        return []
    settings = session_of(config).settings
    return ["causal-lm: " + ", ".join(settings.describe(everything=config.get_verbosity() > 1))]


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
