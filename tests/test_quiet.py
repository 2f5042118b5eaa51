"""On every supported transformers (CI runs this file on the oldest and the newest 5.x too), the plugin adds no
deprecation of its own making to a user's run: no DeprecationWarning or FutureWarning, and no deprecation line
in the log (transformers logs most of its deprecations instead of warning)."""

from __future__ import annotations

import re

import pytest


def test_the_built_in_suite_adds_no_warning_or_log_line_to_a_users_run(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-s",  # transformers' log handler writes to the terminal, as in a user's CI log
        "-W",
        "error::DeprecationWarning",
        "-W",
        "error::FutureWarning",
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-checkpoint=tiny:llama",
        "--causal-lm-suite=only",
        "--causal-lm-offload-parity",
        "-p",
        "no:cacheprovider",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 50
    log = [line for line in result.outlines + result.errlines if re.search(r"deprecat", line, re.I)]
    assert not log, "\n".join(log)
