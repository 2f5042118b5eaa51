"""Everything the plugin keeps for one pytest session, in one object the plugin owns.

Fixtures, the suite and the hooks read it through ``session_of(config)``;
nothing imports plugin.py for its state. Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .benchmark import BenchmarkCollector
from .loading import ModelCache, Target
from .report import VerdictTable
from .settings import Settings

__all__ = ["DEFAULT_SNAPSHOT_DIR", "CausalLMSession", "session_of"]

DEFAULT_SNAPSHOT_DIR = "causal_lm_snapshots"


@dataclass
class CausalLMSession:
    """Settings, the loaded models, benchmark measurements, the verdict and the reference outputs of a session."""

    config: pytest.Config
    settings: Settings
    models: ModelCache
    benchmarks: BenchmarkCollector = field(default_factory=BenchmarkCollector)
    verdict: VerdictTable = field(default_factory=VerdictTable)
    references: dict[str, Any] = field(default_factory=dict)  # reference outputs (or load error) per device
    last_test_of: dict[str, Target] = field(default_factory=dict)  # nodeid of each target's last test
    load_failure_shown_at: dict[Target, str] = field(default_factory=dict)  # where a load failure was reported
    current_item: pytest.Item | None = None  # the test being set up

    @property
    def rootpath(self) -> Path:
        return self.config.rootpath

    def snapshot_root(self) -> Path:
        """Where behaviour snapshots live: the configured directory, relative to the rootdir."""
        return self.rootpath / Path(self.settings.snapshot_dir or DEFAULT_SNAPSHOT_DIR).expanduser()

    def snapshots_enabled(self) -> bool:
        """The snapshot test runs when a snapshot directory is configured or exists, or on --snapshot-update."""
        return (
            self.settings.snapshot_dir is not None
            or bool(self.config.getoption("update_snapshots", False))
            or self.snapshot_root().is_dir()
        )

    def benchmarks_enabled(self) -> bool:
        return bool(self.settings.benchmark or self.config.getoption("benchmark_only", False))


_SESSION_KEY = pytest.StashKey[CausalLMSession]()


def start_session(config: pytest.Config, settings: Settings) -> CausalLMSession:
    session = CausalLMSession(
        config=config, settings=settings, models=ModelCache(seed=settings.seed, atol=settings.atol, rtol=settings.rtol)
    )
    config.stash[_SESSION_KEY] = session
    return session


def session_of(config: pytest.Config) -> CausalLMSession:
    """The plugin's state for this pytest session."""
    return config.stash[_SESSION_KEY]


def has_session(config: pytest.Config) -> bool:
    return _SESSION_KEY in config.stash
