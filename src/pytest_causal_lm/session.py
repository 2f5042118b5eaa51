"""Everything the plugin keeps for one pytest session, in one object the plugin owns.

Fixtures, the suite and the hooks read it through ``session_of(config)``;
nothing imports plugin.py for its state. Importing this module does not import torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .benchmark import BenchmarkCollector
from .loading import ModelCache
from .report import VerdictTable
from .settings import Settings
from .targets import Target

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
    suite_hidden_under: Path | None = None  # an environment pytest skips that holds the suite (plugin._hidden_root)
    suite_items: int = 0  # the built-in suite's tests collected, before -k/-m deselect any
    passed_items: list[pytest.Item] = field(default_factory=list)  # tests whose call passed, in this process
    _snapshot_extension: type | None = None

    @property
    def rootpath(self) -> Path:
        return self.config.rootpath

    def snapshot_root(self) -> Path:
        """Where behaviour snapshots live: the configured directory (anchored by settings), else one in the rootdir."""
        return Path(self.settings.snapshot_dir) if self.settings.snapshot_dir else self.rootpath / DEFAULT_SNAPSHOT_DIR

    def snapshot_extension(self) -> type:
        """This session's syrupy extension: it judges as unused only snapshots of tests that ran and passed here.

        So ``--snapshot-update`` for one checkpoint never deletes the snapshots of the others.
        """
        if self._snapshot_extension is None:
            from syrupy.location import PyTestLocation

            from .snapshot import snapshot_extension

            def may_judge_unused(name: str) -> bool:
                passed = {extension.get_snapshot_name(test_location=PyTestLocation(i)) for i in self.passed_items}
                return name in passed or re.sub(r"\.\d+$", "", name) in passed  # "name.1": its 2nd assertion

            self._snapshot_extension = extension = snapshot_extension(self.snapshot_root(), may_judge_unused)
        return self._snapshot_extension

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
