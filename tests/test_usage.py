"""A run must not go green having tested nothing: typos, unknown markers, early stops, paths as pytest anchors them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pytest_causal_lm as clm


def _usage_error(result: pytest.RunResult, *lines: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines(list(lines))


def test_a_misspelt_ini_key_or_variable_is_a_usage_error_naming_the_real_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\ncausal_lm_checkpoints = tiny:qwen3\n")
    _usage_error(
        pytester.runpytest(), "*ini key causal_lm_checkpoints: no such *setting; did you mean causal_lm_checkpoint?"
    )
    pytester.makeini("[pytest]\n")
    monkeypatch.setenv("CAUSAL_LM_CHECKPOINTS", "tiny:qwen3")
    _usage_error(
        pytester.runpytest(),
        "*environment variable CAUSAL_LM_CHECKPOINTS: no such *setting; did you mean CAUSAL_LM_CHECKPOINT?",
    )
    monkeypatch.delenv("CAUSAL_LM_CHECKPOINTS")
    monkeypatch.setenv("CAUSAL_LM_TEST_ANYTHING", "1")  # left to test code
    pytester.makepyfile("def test_nothing(): pass")
    pytester.runpytest().assert_outcomes(passed=1)


def test_require_checkpoint_makes_a_session_without_one_an_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_uses(causal_lm): pass")
    pytester.runpytest().assert_outcomes(skipped=1)
    pytester.makeini("[pytest]\ncausal_lm_require_checkpoint = true\n")
    _usage_error(
        pytester.runpytest(), "*--causal-lm-require-checkpoint: no checkpoint configured; pass --causal-lm-checkpoint=*"
    )
    pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "-p", "no:randomly", "-k", "uses").assert_outcomes(passed=1)


def test_an_unknown_causal_lm_marker_names_the_closest_one(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "-m", "causal_lm_causalty or causal_lm_cache")
    _usage_error(result, "*-m causal_lm_causalty: no such marker; did you mean causal_lm_causality? (pytest --markers*")
    assert "causal_lm_vocab" not in result.stderr.str()  # one name, not the list of twenty


def test_an_early_stop_lists_every_test_that_never_started(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=./missing", "--causal-lm-checkpoint=tiny:qwen3", "-x")
    result.assert_outcomes(errors=1)
    per_target = len(clm.invariants())
    result.stdout.fnmatch_lines(
        [
            f"*{2 * per_target - 1} x never started: the session stopped early (-x, --maxfail or interrupted): "
            f"missing-cpu-float32 ({per_target - 1}), tiny-qwen3-cpu-float32 ({per_target})"
        ]
    )


def test_relative_paths_in_an_ini_file_are_anchored_at_its_directory(
    pytester: pytest.Pytester, qwen3_path: Path
) -> None:
    shutil.copytree(qwen3_path, pytester.path / "checkpoints" / "my-model")
    pytester.makeini(
        "[pytest]\n"
        "causal_lm_checkpoint = checkpoints/my-model\n"
        "causal_lm_report = reports/verdict.json\n"
        "causal_lm_snapshot_dir = snaps\n"
    )
    (pytester.path / "tests").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(pytester.path / "tests")
        result = pytester.runpytest("-k", "determinism or snapshot", "--snapshot-update")
    result.assert_outcomes(passed=2)
    assert (pytester.path / "reports" / "verdict.json").is_file()
    assert len(list((pytester.path / "snaps").rglob("*.json"))) == 1
    assert not (pytester.path / "tests" / "reports").exists()
    # on the command line a path stays relative to where pytest runs
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(pytester.path / "tests")
        result = pytester.runpytest("-k", "determinism", "--causal-lm-report=here.md")
    assert (pytester.path / "tests" / "here.md").is_file()
