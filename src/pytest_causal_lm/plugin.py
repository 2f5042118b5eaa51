"""The pytest11 entry point: options, ini keys, markers, report header, fixtures, built-in suite.

Imports neither torch nor transformers: projects that have the plugin
installed but never configure a checkpoint pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .benchmark import BenchmarkCollector
from .loading import CausalLM, CheckpointLoadError, ModelCache, Target
from .report import VerdictTable
from .settings import OPTIONS, Settings, resolve_settings

SETTINGS_KEY = pytest.StashKey[Settings]()
CACHE_KEY = pytest.StashKey[ModelCache]()
BENCHMARK_KEY = pytest.StashKey[BenchmarkCollector]()
VERDICT_KEY = pytest.StashKey[VerdictTable]()
SUITE_DIR = Path(__file__).parent / "suite"

# Markers of the built-in suite, for -m selection of invariant families.
MARKERS = {
    "causal_lm": "a test of the built-in causal LM invariant suite",
    "causal_lm_shapes": "causal LM invariant: output shapes and finite logits",
    "causal_lm_vocab": "causal LM invariant: logits/vocab alignment and special token ids",
    "causal_lm_causality": "causal LM invariant: prefix causality",
    "causal_lm_determinism": "causal LM invariant: determinism",
    "causal_lm_cache": "causal LM invariant: KV-cache parity and effectiveness",
    "causal_lm_generation": "causal LM invariant: greedy-loop parity with generate",
    "causal_lm_classification": "causal LM invariant: classification-head equivalence",
    "causal_lm_padding": "causal LM invariant: padding and batch invariance",
    "causal_lm_chat": "causal LM invariant: chat template",
    "causal_lm_snapshot": "causal LM behaviour snapshot (syrupy)",
    "causal_lm_benchmark": "cached vs uncached generation benchmark (opt-in: --causal-lm-benchmark)",
    "causal_lm_reference": "drift from a reference checkpoint (opt-in: --causal-lm-reference)",
}
DEFAULT_SNAPSHOT_DIR = "causal_lm_snapshots"

NO_CHECKPOINT_REASON = (
    "no causal LM checkpoint configured: pass --causal-lm-checkpoint=CKPT (e.g. tiny:qwen3), "
    "set CAUSAL_LM_CHECKPOINT, or add causal_lm_checkpoint to [tool.pytest.ini_options]"
)


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


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    settings = resolve_settings(config)
    config.stash[SETTINGS_KEY] = settings
    config.stash[CACHE_KEY] = ModelCache(seed=settings.seed, atol=settings.atol, rtol=settings.rtol)
    config.stash[BENCHMARK_KEY] = BenchmarkCollector()
    config.stash[VERDICT_KEY] = VerdictTable()
    config.pluginmanager.register(_VerdictListener(config.stash[VERDICT_KEY]), "causal-lm-verdict")
    if settings.report and not settings.report.endswith((".md", ".json")):
        raise pytest.UsageError(f"--causal-lm-report: {settings.report!r} must end in .md or .json")
    if settings.checkpoint and settings.suite == "only":
        config.args[:] = [str(SUITE_DIR)]
    elif settings.checkpoint and settings.suite == "on" and str(SUITE_DIR) not in config.args:
        config.args.append(str(SUITE_DIR))


def benchmarks_enabled(config: pytest.Config) -> bool:
    return bool(config.stash[SETTINGS_KEY].benchmark or config.getoption("benchmark_only", False))


def _target_of(item: pytest.Item) -> Target | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("causal_lm_target") if callspec is not None else None


LAST_ITEM_KEY = pytest.StashKey[dict[str, Target]]()  # nodeid of the last test of each target


@pytest.hookimpl(trylast=True)  # after other plugins have reordered: this is the order tests run in
def pytest_collection_finish(session: pytest.Session) -> None:
    last: dict[Target, str] = {}
    for item in session.items:
        target = _target_of(item)
        if target is not None:
            last[target] = item.nodeid
    session.config.stash[LAST_ITEM_KEY] = {nodeid: target for target, nodeid in last.items()}


@pytest.hookimpl(trylast=True)  # after the runner's teardown, so only the cache still holds the model
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Release a model after the last test that uses it, so a run over many checkpoints holds one at a time."""
    target = item.config.stash.get(LAST_ITEM_KEY, {}).get(item.nodeid)
    if target is not None and (nextitem is None or _target_of(nextitem) != target):
        item.config.stash[CACHE_KEY].release(target)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="benchmarks are opt-in: pass --causal-lm-benchmark (or --benchmark-only)")
    for item in items:
        target = _target_of(item)
        if target is not None:  # tags the reports so the verdict table can be built from them alone
            test = getattr(item, "originalname", item.name)
            item.user_properties.append(
                ("causal_lm_cell", {"target": target.id, "test": test, "device": target.device})
            )
        if item.get_closest_marker("causal_lm_benchmark") and not benchmarks_enabled(config):
            item.add_marker(skip)


class _VerdictListener:
    """Feeds every test report to the session's verdict table (on the xdist controller too)."""

    def __init__(self, table: VerdictTable) -> None:
        self.table = table

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.table.add_report(report)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    target = _target_of(item)
    if report.failed and target is not None:
        report.sections.append(("causal-lm", _failure_context(item.config, target)))
    return report


def _failure_context(config: pytest.Config, target: Target) -> str:
    import sys

    settings = config.stash[SETTINGS_KEY]
    versions = {
        name: getattr(sys.modules.get(name), "__version__", "not imported") for name in ("torch", "transformers")
    }
    return "\n".join(
        [
            f"checkpoint: {target.checkpoint}",
            f"revision: {target.revision or 'default'}",
            f"device: {target.device}",
            f"dtype: {target.dtype}",
            f"seed: {settings.seed}",
            f"torch: {versions['torch']}",
            f"transformers: {versions['transformers']}",
        ]
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    _benchmark_summary(terminalreporter, config)
    _verdict_summary(terminalreporter, config)


def _verdict_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    from .report import device_name, library_versions

    table = config.stash.get(VERDICT_KEY, None)
    if table is None or not table.cells:
        return
    settings = config.stash[SETTINGS_KEY]
    collector = config.stash[BENCHMARK_KEY]
    for target_id in collector.targets():
        table.speedups[target_id] = collector.speedup_summary(target_id)
    terminalreporter.section("causal-lm verdict")
    for line in table.terminal_lines(config.get_verbosity()):
        terminalreporter.write_line(line)
    if not settings.report and not settings.github_summary:
        return
    table.devices = {target: device_name(device) for target, device in table.devices.items()}
    versions, described = library_versions(), settings.describe()
    if settings.report:
        path = config.rootpath / settings.report
        path.parent.mkdir(parents=True, exist_ok=True)
        text = table.to_json(versions, described) if path.suffix == ".json" else table.to_markdown(versions, described)
        path.write_text(text, encoding="utf-8")
        terminalreporter.write_line(f"causal-lm report written to {path}")
    if settings.github_summary:
        import os

        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(table.to_markdown(versions, described) + "\n")
            terminalreporter.write_line(f"causal-lm verdict appended to {summary}")
        else:
            terminalreporter.write_line("causal-lm: GITHUB_STEP_SUMMARY is not set; no job summary written")


def _benchmark_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    collector = config.stash.get(BENCHMARK_KEY, None)
    if not collector or not collector.measurements:
        return
    terminalreporter.section("causal-lm benchmark: greedy generation, cached vs uncached")
    for target_id in collector.targets():
        terminalreporter.write_line(target_id)
        for line in collector.table(target_id):
            terminalreporter.write_line("  " + line)
    plot = collector.plot(config.rootpath / config.stash[SETTINGS_KEY].benchmark_plot)
    if plot is None:
        terminalreporter.write_line("plot skipped: pip install matplotlib to draw time vs new tokens")
    else:
        terminalreporter.write_line(f"plot of time vs new tokens: {plot}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(SETTINGS_KEY, None)
    if settings is None:
        return []
    return ["causal-lm: " + ", ".join(settings.describe(everything=config.get_verbosity() > 0))]


def targets_of(settings: Settings) -> list[Target]:
    """Every checkpoint x device combination to test, with ``auto`` devices resolved."""
    from .devices import resolve_device

    devices = ["cpu"] if settings.device_map else list(dict.fromkeys(resolve_device(d) for d in settings.device))
    return [
        Target(
            checkpoint=checkpoint,
            device=device,
            dtype=settings.dtype,
            revision=settings.revision,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
            device_map=settings.device_map,
        )
        for checkpoint in settings.checkpoint
        for device in devices
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = metafunc.config.stash[SETTINGS_KEY]
    if "causal_lm_new_tokens" in metafunc.fixturenames:
        sweep = [(use_cache, n) for n in settings.benchmark_new_tokens for use_cache in (False, True)]
        metafunc.parametrize(
            ("causal_lm_use_cache", "causal_lm_new_tokens"),
            sweep,
            ids=[f"{'cached' if use_cache else 'uncached'}-{n}" for use_cache, n in sweep],
        )
    if "causal_lm_target" not in metafunc.fixturenames:
        return
    if not settings.checkpoint:
        return  # the fixture skips with NO_CHECKPOINT_REASON
    targets = targets_of(settings)
    metafunc.parametrize("causal_lm_target", targets, ids=[t.id for t in targets], indirect=True, scope="session")


@pytest.fixture(scope="session")
def causal_lm_target(request: pytest.FixtureRequest) -> Target:
    """The checkpoint/device/dtype under test; parametrised from the settings. Override in a conftest."""
    from .devices import unavailable_reason

    target = getattr(request, "param", None)
    if target is None:
        pytest.skip(NO_CHECKPOINT_REASON)
    reason = unavailable_reason(target.device)
    if reason:
        pytest.skip(reason)
    return target


@pytest.fixture(scope="session")
def causal_lm(request: pytest.FixtureRequest, causal_lm_target: Target) -> Iterator[CausalLM]:
    """The loaded checkpoint: model, tokenizer, tolerance, target. Loaded once per session."""
    cache = request.config.stash[CACHE_KEY]
    try:
        handle = cache.get(causal_lm_target)
    except CheckpointLoadError as exc:
        problem = str(exc)
    else:
        problem = None
    if problem is not None:  # failed outside the except block so no chained exception is printed
        pytest.fail(f"cannot load {causal_lm_target.checkpoint}: {problem}", pytrace=False)
    yield handle


def snapshot_root(config: pytest.Config) -> Path:
    """Where behaviour snapshots live: the configured directory, relative to the rootdir."""
    configured = config.stash[SETTINGS_KEY].snapshot_dir or DEFAULT_SNAPSHOT_DIR
    return config.rootpath / Path(configured).expanduser()


def snapshots_enabled(config: pytest.Config) -> bool:
    """The built-in snapshot test runs when a snapshot directory is configured or exists, or on --snapshot-update."""
    return (
        config.stash[SETTINGS_KEY].snapshot_dir is not None
        or bool(config.getoption("update_snapshots", False))
        or snapshot_root(config).is_dir()
    )


@pytest.fixture
def causal_lm_snapshot(request: pytest.FixtureRequest, snapshot: Any) -> Any:
    """syrupy's ``snapshot`` with the causal-lm extension: ``assert causal_lm_snapshot == behaviour_record(...)``."""
    from .snapshot import snapshot_extension

    return snapshot.use_extension(snapshot_extension(snapshot_root(request.config)))


REFERENCE_KEY = pytest.StashKey[dict[str, Any]]()


@pytest.fixture(scope="session")
def causal_lm_reference(request: pytest.FixtureRequest, causal_lm_target: Target) -> Any:
    """The reference checkpoint's outputs on the candidate's device, computed once; the reference model is freed.

    Request it before ``causal_lm`` so the reference is gone before the candidate loads.
    """
    import gc

    from .checks.reference import reference_outputs
    from .loading import load

    settings = request.config.stash[SETTINGS_KEY]
    if not settings.reference:
        pytest.skip("no reference configured: pass --causal-lm-reference=CKPT to compare checkpoints with it")
    computed = request.config.stash.setdefault(REFERENCE_KEY, {})
    key = causal_lm_target.device
    if key not in computed:
        target = Target(
            checkpoint=settings.reference,
            device=causal_lm_target.device,
            dtype=settings.reference_dtype,
            revision=None,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
        )
        try:
            handle = load(target, seed=settings.seed)
        except CheckpointLoadError as exc:
            computed[key] = f"cannot load the reference {settings.reference}: {exc}"
        else:
            computed[key] = reference_outputs(
                handle.model, handle.tokenizer, prompts=_reference_prompts(request.config)
            )
            del handle
            gc.collect()
    if isinstance(computed[key], str):
        pytest.fail(computed[key], pytrace=False)
    return computed[key]


def _reference_prompts(config: pytest.Config) -> list[str]:
    import json

    from .checks.reference import REFERENCE_PROMPTS

    path = config.stash[SETTINGS_KEY].reference_prompts
    if not path:
        return list(REFERENCE_PROMPTS)
    text = (config.rootpath / path).read_text(encoding="utf-8")
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
