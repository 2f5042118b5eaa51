"""The verdict table, the Markdown/JSON reports, the failure context, and the examples that use them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"

# Scores that change from run to run: a model whose kernels ignore eval() and stay random.
NOISY_CONFTEST = """
import pytest
import torch


@pytest.fixture(scope="session")
def causal_lm(causal_lm):
    causal_lm.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: output + 0.1 * torch.randn_like(output)
    )
    return causal_lm
"""

ARGS = (
    "--causal-lm-checkpoint=tiny:qwen3",
    "--causal-lm-suite=only",
    "-m",
    "causal_lm_shapes or causal_lm_determinism or causal_lm_snapshot or causal_lm_chat",
    "-k",
    "not (chat_markers or generation_prompt or turn_terminator or chat_turns)",  # the chat family's template test only
)


@pytest.fixture
def noisy(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(NOISY_CONFTEST)
    return pytester


def test_terminal_table_shows_pass_fail_and_skip_cells_with_figures(noisy: pytest.Pytester) -> None:
    result = noisy.runpytest(*ARGS)
    result.assert_outcomes(passed=2, failed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*= causal-lm verdict =*",
            "checkpoint-device-dtype shap keep det  chat snap",
            "tiny-qwen3-cpu-float32  ok   FAIL FAIL ok   skip",
            "legend: shap=output shapes, keep=logits_to_keep, det=determinism, chat=chat template, snap=*",
            "  tiny-qwen3-cpu-float32 logits_to_keep FAIL Δ * logits_to_keep=1 scores differ from the full forward's last 1 row(s)",
            "  tiny-qwen3-cpu-float32 determinism FAIL Δ *: non-deterministic scores: the same input gave different scores at position 0",
        ]
    )


def test_quiet_gives_one_line_per_target_and_verbose_every_figure(noisy: pytest.Pytester) -> None:
    quiet = noisy.runpytest(*ARGS, "-q")
    quiet.stdout.fnmatch_lines(["tiny-qwen3-cpu-float32: 2 FAIL, 2 ok, 1 skip"])
    verbose = noisy.runpytest(*ARGS, "-v")
    verbose.stdout.fnmatch_lines(["  tiny-qwen3-cpu-float32 behaviour snapshot skip: behaviour snapshots are opt-in*"])


def test_failing_reports_carry_a_causal_lm_section(noisy: pytest.Pytester) -> None:
    result = noisy.runpytest(*ARGS)
    result.stdout.fnmatch_lines(
        [
            "*- causal-lm -*",
            "checkpoint tiny:qwen3, revision default, device cpu, dtype float32, seed 0, torch 2.*, transformers 5.*",
        ]
    )


_MARKDOWN_PARTS = ("## causal-lm verdict", "### Failures", "### Skips and notes", "every invariant, by family")


def test_markdown_and_json_reports_are_complete(noisy: pytest.Pytester) -> None:
    noisy.runpytest(*ARGS, "--causal-lm-report=reports/verdict.md")
    markdown = (noisy.path / "reports" / "verdict.md").read_text()
    summary, failures, notes, by_family = (markdown.split(title)[1] for title in _MARKDOWN_PARTS)
    assert "| `tiny-qwen3-cpu-float32` | ❌ FAIL | 2 | 2 | 1 | logits_to_keep, determinism |" in summary
    assert failures.splitlines()[2].startswith("- `tiny-qwen3-cpu-float32` logits_to_keep: ❌ FAIL Δ 0.")
    assert "- `tiny-qwen3-cpu-float32` behaviour snapshot: ⏭ skip: behaviour snapshots are opt-in" in notes
    assert "| shapes | output shapes | ✅ pass |\n|  | logits_to_keep | ❌ FAIL Δ " in by_family
    assert "| snapshot | behaviour snapshot | ⏭ skip |" in by_family
    for line in ("- torch: 2.", "- transformers: 5.", "- python: 3.", "- checkpoint=tiny:qwen3 (option)"):
        assert line in markdown, line
    noisy.runpytest(*ARGS, "--causal-lm-report=verdict.json")
    report = json.loads((noisy.path / "verdict.json").read_text())
    assert set(report) == {"versions", "settings", "targets", "not_run"}
    assert set(report["versions"]) == {"python", "torch", "transformers", "pytest-causal-lm"}
    assert report["settings"]["checkpoint"] == {"value": ["tiny:qwen3"], "source": "option"}
    assert report["settings"]["dtype"] == {"value": "float32", "source": "default"}
    (key,) = report["targets"]
    target = report["targets"][key]
    assert key == "tiny:qwen3 revision=default device=cpu dtype=float32"
    assert target["label"] == "tiny-qwen3-cpu-float32"
    cells = target["invariants"]
    assert {name: cell["outcome"] for name, cell in cells.items()} == {
        "output_shapes": "ok",
        "logits_to_keep": "FAIL",
        "determinism": "FAIL",
        "chat_template": "ok",
        "behaviour_snapshot": "skip",
    }
    assert cells["chat_template"]["name"] == "chat template"
    figure = cells["determinism"]["figure"]
    assert figure["label"] == "Δ" and isinstance(figure["value"], float) and figure["value"] > 1e-4
    assert isinstance(cells["determinism"]["position"], int) and isinstance(cells["determinism"]["token_id"], int)
    tolerance = cells["determinism"]["tolerance"]
    assert (tolerance["atol"], tolerance["rtol"]) == (1e-4, 1e-4) and 0 < tolerance["noise"] < 2.5e-5
    assert re.fullmatch(
        r"noise floor \S+ \(float32 vs float64, .*\); atol = max\(table 0.0001, 4x the floor\)",
        tolerance["noise_source"],
    )
    assert target["device_name"] and target["device_name"] not in ("x86_64", "cpu")


def test_report_path_must_be_markdown_or_json(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--causal-lm-report=verdict.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--causal-lm-report: '*verdict.txt' must end in .md or .json*"])


def test_github_job_summary_is_appended_when_asked(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = pytester.path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.runpytest(*ARGS).assert_outcomes(passed=4, skipped=1)
    assert summary.read_text() == "earlier step\n"  # not asked: untouched
    pytester.runpytest(*ARGS, "--causal-lm-github-summary").assert_outcomes(passed=4, skipped=1)
    text = summary.read_text()
    assert text.startswith("earlier step\n## causal-lm verdict\n") and "| `tiny-qwen3-cpu-float32` | ✅ pass" in text


def test_model_repo_example_runs_suite_custom_prompts_and_benchmark(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLES / "model-repo", pytester.path, dirs_exist_ok=True)
    result = pytester.runpytest("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0
    # 4 custom-prompt tests + the benchmark example + the built-in invariants
    assert outcomes["passed"] >= 5 + 13
    report = (pytester.path / "causal-lm-report.md").read_text()
    assert report.startswith("## causal-lm verdict") and "✅ pass" in report
    # a benchmark-only run skips the suite: it must not replace the verdict of the run that ran it
    only = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        "--causal-lm-benchmark-new-tokens=2",
        "--causal-lm-benchmark-prompt-lengths=8",
        "--causal-lm-benchmark-modes=no_cache,dynamic",
        "--causal-lm-benchmark-rounds=1",
    )
    assert only.parseoutcomes()["passed"] == 3  # this repo's benchmark, and the built-in one in two modes
    only.stdout.fnmatch_lines(
        [
            "*causal-lm verdict*",
            "no invariant ran in this session",
            "*benchmark tok/s at 2 new tokens*",
            "not run: * test(s)",
            "causal-lm: no invariant ran in this session; the report was left as it was",
        ]
    )
    assert "checkpoint-device-dtype" not in only.stdout.str()  # no table of skips
    assert (pytester.path / "causal-lm-report.md").read_text() == report


def test_github_actions_example_uses_only_options_that_exist() -> None:
    from pytest_causal_lm.settings import OPTIONS

    workflow = (EXAMPLES / "github-actions" / "causal-lm.yml").read_text()
    used = set(re.findall(r"--causal-lm-[a-z-]+", workflow))
    assert used <= {spec.option for spec in OPTIONS}, used - {spec.option for spec in OPTIONS}
    assert {"--causal-lm-report", "--causal-lm-github-summary", "--causal-lm-benchmark"} <= used
    for fragment in ("actions/cache@", "--benchmark-json=benchmark.json", "causal_lm_snapshots/", "upload-artifact"):
        assert fragment in workflow, fragment


def _table_part(markdown: str) -> str:
    """The verdict table and its failures/notes: what must not depend on how the runs were split."""
    return markdown.split("### Environment")[0]


def test_merged_reports_of_two_runs_give_the_table_of_one_run_over_both(pytester: pytest.Pytester) -> None:
    from pytest_causal_lm.report import main

    selection = ("--causal-lm-suite=only", "-m", "causal_lm_shapes or causal_lm_vocab", "-p", "no:cacheprovider")
    for name in ("qwen3", "llama"):
        pytester.runpytest(f"--causal-lm-checkpoint=tiny:{name}", *selection, f"--causal-lm-report={name}.json")
    both = ("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-checkpoint=tiny:llama")
    pytester.runpytest(*both, *selection, "--causal-lm-report=both.md")
    assert main(["merge", "qwen3.json", "llama.json", "--output", "merged.md"]) == 0
    merged = (pytester.path / "merged.md").read_text()
    assert _table_part(merged) == _table_part((pytester.path / "both.md").read_text())
    assert "| `tiny-qwen3-cpu-float32` | ✅ pass" in merged and "| `tiny-llama-cpu-float32` | ✅ pass" in merged
    assert "- merged from 2 reports" in merged


def test_merge_fails_when_a_merged_run_failed_and_says_what_it_cannot_read(
    noisy: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_causal_lm.report import main

    noisy.runpytest(*ARGS, "--causal-lm-report=noisy.json")
    assert main(["merge", "noisy.json", "--output", "merged.json"]) == 1  # determinism failed in that run
    merged = json.loads((noisy.path / "merged.json").read_text())
    assert (
        merged["targets"]["tiny:qwen3 revision=default device=cpu dtype=float32"]["invariants"]["determinism"][
            "outcome"
        ]
        == "FAIL"
    )
    (noisy.path / "verdict.md").write_text("# not JSON")
    assert main(["merge", "verdict.md"]) == 2
    assert "cannot merge: JSONDecodeError" in capsys.readouterr().out


def test_a_device_map_target_key_reads_back_as_the_same_target() -> None:
    from pytest_causal_lm.targets import Target

    target = Target("./my models/m", "cuda", "bfloat16", revision="v2", device_map="auto")
    assert Target.from_key(target.key) == target


def test_matrix_workflow_example_merges_the_reports_its_jobs_write() -> None:
    from pytest_causal_lm.settings import OPTIONS

    workflow = (EXAMPLES / "github-actions" / "causal-lm-matrix.yml").read_text()
    used = set(re.findall(r"--causal-lm-[a-z-]+", workflow))
    assert used <= {spec.option for spec in OPTIONS}, used - {spec.option for spec in OPTIONS}
    assert workflow.count("--causal-lm-report=causal-lm-${{ matrix.slice.name }}.json") == 1
    assert "python -m pytest_causal_lm merge causal-lm-*.json" in workflow
    for fragment in ("matrix:", "needs: invariants", "download-artifact@", "merge-multiple: true"):
        assert fragment in workflow, fragment
