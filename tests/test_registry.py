"""The invariant registry, structured results and a checkpoint's identity kept whole."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugin import RUN_BY_DEFAULT

import pytest_causal_lm as clm
from pytest_causal_lm.registry import markdown_table, markers
from pytest_causal_lm.targets import Target, with_unique_labels

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "pytest_causal_lm"


def test_every_invariant_has_one_test_marker_and_column() -> None:
    registered = clm.invariants()
    assert len({i.test_name for i in registered}) == len({i.column for i in registered}) == len(registered)
    for invariant in registered:
        assert invariant.marker_name in markers()
        assert clm.invariant_for_test(invariant.test_name) is invariant


def test_each_invariant_has_one_name_its_helper_lives_in_its_familys_module() -> None:
    for invariant in clm.invariants():
        helper = getattr(clm, invariant.helper)
        assert helper.__module__ in (
            f"pytest_causal_lm.checks.{invariant.marker}",
            f"pytest_causal_lm.{invariant.marker}",
        ), f"{invariant.key}: {invariant.helper} lives in {helper.__module__}, marker {invariant.marker_name}"
        assert invariant.key.split("_")[0][:5] in invariant.helper, (invariant.key, invariant.helper)


def test_an_invariant_with_a_run_of_its_own_calls_its_helper() -> None:
    """The glue cannot drift from the helper the docs name: a derived run calls it, a custom one must too."""
    for invariant in clm.invariants():
        if invariant.run is not None:
            assert invariant.helper in invariant.run.__code__.co_names, invariant.key


def test_an_invariant_needs_a_run_or_a_helper_the_checks_have() -> None:
    with pytest.raises(ValueError, match=r"checks has no helper 'assert_nothing'"):
        clm.register_invariant(clm.Invariant("nothing", "nothing", "none", "x", "x", helper="assert_nothing"))


def test_a_column_or_key_cannot_be_taken_twice() -> None:
    shapes = clm.invariant_for_test("test_output_shapes")
    with pytest.raises(ValueError, match="already registered"):
        clm.register_invariant(shapes)
    with pytest.raises(ValueError, match="column 'shap' is taken by 'output_shapes'"):
        clm.register_invariant(clm.Invariant("other", "other", "shap", "x", "x", shapes.run))


def test_the_docs_tables_are_generated_from_the_code() -> None:
    """The invariants, options and public API pages hold what scripts/docs_tables.py writes from the code."""
    assert markdown_table() in (ROOT / "docs" / "invariants.md").read_text()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_tables.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_no_function_of_the_package_is_longer_than_60_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_suite_and_examples_import_only_the_public_api() -> None:
    files = [*(ROOT / "src" / "pytest_causal_lm" / "suite").glob("*.py"), *(ROOT / "examples").rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_causal_lm"):
                assert node.module == "pytest_causal_lm", f"{path.name} imports {node.module}"
                assert all(alias.name in clm.__all__ for alias in node.names), path.name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "clm":
                assert node.attr in clm.__all__, f"{path.name} uses clm.{node.attr}, not in __all__"


def test_labels_grow_until_names_no_longer_collide() -> None:
    def labels(*checkpoints: str) -> list[str]:
        return [t.id for t in with_unique_labels([Target(c, "cpu", "float32") for c in checkpoints])]

    assert labels("/x/a/model", "/x/b/model") == ["a-model-cpu-float32", "b-model-cpu-float32"]
    assert labels("org1/Llama-3-8B", "org2/Llama-3-8B", "tiny:qwen3") == [
        "org1-Llama-3-8B-cpu-float32",
        "org2-Llama-3-8B-cpu-float32",
        "tiny-qwen3-cpu-float32",
    ]
    assert labels("/x/a/base/model", "/x/b/base/model") == ["a-base-model-cpu-float32", "b-base-model-cpu-float32"]
    assert labels("./model", "model") == ["model-cpu-float32", "model-cpu-float32#2"]
    assert labels("/only/one/model") == ["model-cpu-float32"]


def test_two_checkpoints_with_one_folder_name_stay_two_targets(
    pytester: pytest.Pytester, qwen3_path: Path, llama_path: Path
) -> None:
    for parent, source in (("a", qwen3_path), ("b", llama_path)):
        shutil.copytree(source, pytester.path / parent / "model")
    result = pytester.runpytest(
        "--causal-lm-checkpoint=a/model",
        "--causal-lm-checkpoint=b/model",
        "--causal-lm-suite=only",
        "--causal-lm-benchmark",
        "--causal-lm-benchmark-new-tokens=2",
        "--causal-lm-benchmark-prompt-lengths=4",
        "--causal-lm-benchmark-modes=no_cache,dynamic",
        "--causal-lm-benchmark-rounds=1",
        "--benchmark-json=bench.json",
        "--causal-lm-report=verdict.json",
        "-m",
        "causal_lm_determinism or causal_lm_benchmark",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["a-model-cpu-float32 * ok *", "b-model-cpu-float32 * ok *"])
    report = json.loads((pytester.path / "verdict.json").read_text())
    assert sorted(t["label"] for t in report["targets"].values()) == ["a-model-cpu-float32", "b-model-cpu-float32"]
    assert sorted(report["targets"]) == [
        "a/model revision=default device=cpu dtype=float32",
        "b/model revision=default device=cpu dtype=float32",
    ]
    groups = {entry["group"] for entry in json.loads((pytester.path / "bench.json").read_text())["benchmarks"]}
    assert groups == {"a-model-cpu-float32 prompt=4 new_tokens=2", "b-model-cpu-float32 prompt=4 new_tokens=2"}


def test_a_missing_checkpoint_is_reported_once_and_the_healthy_one_runs(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-checkpoint=./missing/model",
        "--causal-lm-checkpoint=tiny:no_such_architecture",
        "--causal-lm-suite=only",
        "-q",
        "-p",
        "no:cacheprovider",
    )
    lines = result.stdout.lines
    assert len(lines) <= 40, "\n".join(lines)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == RUN_BY_DEFAULT and outcomes["errors"] == 2 and "failed" not in outcomes
    text = result.stdout.str()
    # the failure and the verdict row; with CI=true pytest also repeats it, untruncated, in its short summary
    cause = [line for line in lines if "checkpoint path ./missing/model does not exist" in line]
    assert len([line for line in cause if not line.startswith("ERROR ")]) == 2
    result.stdout.fnmatch_lines(
        [
            "model-cpu-float32: could not load: checkpoint path ./missing/model does not exist. Fix: check the path.",
            "tiny-no_such_architecture-cpu-float32: could not load: the tiny builder failed: unknown tiny checkpoint*",
            f"  {len(clm.invariants()) - 1} x model-cpu-float32 could not load (reported once, at {clm.invariants()[0].test_name}[model-cpu-float32])",
        ]
    )
    assert "Traceback" not in text


TOY_CONFTEST = """
import pytest_causal_lm as clm


def _no_lm_head_bias(causal_lm):
    head = causal_lm.model.get_output_embeddings()
    assert getattr(head, "bias", None) is None, "lm_head has a bias"


clm.register_invariant(
    clm.Invariant("toy_head_bias", "toy head bias", "toy", "toy", "lm_head has no bias", _no_lm_head_bias)
)
"""


def test_registering_an_invariant_adds_its_test_marker_and_column(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(TOY_CONFTEST)
    # a subprocess: the registry is process-wide, and this toy must not leak into other tests
    markers_run = pytester.runpytest_subprocess("--markers")
    markers_run.stdout.fnmatch_lines(["@pytest.mark.causal_lm_toy: causal LM invariant: toy head bias"])
    result = pytester.runpytest_subprocess(
        "--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=only", "-m", "causal_lm_toy", "-v"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_causal_lm_invariants.py::test_toy_head_bias[[]tiny-qwen3-cpu-float32[]] PASSED*",
            "checkpoint-device-dtype toy*",
            "tiny-qwen3-cpu-float32  ok*",
            "legend: toy=toy head bias;*",
        ]
    )


ERRING_CONFTEST = """
import torch
import pytest_causal_lm as clm


def _reads_past_the_vocabulary(causal_lm):
    causal_lm.model(input_ids=torch.tensor([[10**6]]))


clm.register_invariant(clm.Invariant("toy_vocab_read", "toy vocab read", "toyv", "toy", "reads", _reads_past_the_vocabulary))
"""


def test_an_error_in_a_check_is_one_failure_naming_it_and_its_module(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ERRING_CONFTEST)
    result = pytester.runpytest_subprocess(
        "--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=only", "-m", "causal_lm_toy"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   AssertionError: toy vocab read raised IndexError: index out of range in self",
            "*in module  : model.embed_tokens (Embedding)",
            "*raised at  : */torch/nn/functional.py:* in embedding",
            "*toy vocab read FAIL*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_the_version_lives_in_one_place_and_the_changelog_names_it() -> None:
    from importlib.metadata import version

    root = Path(__file__).parents[1]
    assert version("pytest-causal-lm") == clm.__version__
    assert f"## {clm.__version__}" in (root / "CHANGELOG.md").read_text()
    assert "version = " not in (root / "pyproject.toml").read_text().split("[project.urls]")[0]
