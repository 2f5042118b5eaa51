"""The plugin's fixtures: the settings, the target, the loaded checkpoint, its reference and its snapshot.

Registered by ``plugin.py`` (``pytest_plugins``). Imports neither torch nor transformers until a fixture runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .loading import CausalLM, CheckpointLoadError
from .session import CausalLMSession, session_of
from .settings import HOW_TO_CONFIGURE, Settings
from .targets import Target

NO_CHECKPOINT_REASON = "no causal LM checkpoint configured: " + HOW_TO_CONFIGURE


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

    from .checkpoint_files import weights_size

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


NO_CHECKPOINT_REASON = "no causal LM checkpoint configured: " + HOW_TO_CONFIGURE
