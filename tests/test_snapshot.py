"""Behaviour snapshots through syrupy: written once, compared with tolerance, readable when they differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pytest_causal_lm.snapshot import compare_records

EXAMPLE = Path(__file__).parents[1] / "examples" / "model-repo-snapshots"


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _perturb(checkpoint: Path, scale: float = 0.5) -> None:
    """Damage the weights the way a bad conversion does: noise on one layer's MLP."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=generator) * scale)
    model.save_pretrained(checkpoint)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.json"))}


@pytest.fixture
def checkpoints(pytester: pytest.Pytester, qwen3_path: Path, llama_path: Path) -> tuple[Path, Path]:
    return _copy(qwen3_path, pytester.path / "ckpt-qwen3"), _copy(llama_path, pytester.path / "ckpt-llama")


def _run(pytester: pytest.Pytester, *checkpoints: Path, extra: tuple[str, ...] = ()) -> pytest.RunResult:
    args = [f"--causal-lm-checkpoint={c}" for c in checkpoints]
    return pytester.runpytest(*args, "--causal-lm-snapshot-dir=snaps", "-k", "snapshot", *extra)


def test_update_writes_readable_files_named_by_target_then_a_second_run_passes(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    first = _run(pytester, *checkpoints, extra=("--snapshot-update",))
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*2 snapshots generated*"])
    files = _files(pytester.path / "snaps")
    assert sorted(files) == [
        "test_causal_lm_invariants/test_behaviour_snapshot[ckpt-llama-cpu-float32].json",
        "test_causal_lm_invariants/test_behaviour_snapshot[ckpt-qwen3-cpu-float32].json",
    ]
    record = json.loads(files[sorted(files)[1]])
    assert record["facts"]["vocab_size"] == 384 and record["tolerance"] == {"logprob": 0.001}
    assert [p["prompt"] for p in record["prompts"]][-1] == "chat 'How are you?'"
    assert '{"text": "Hi dog", "top": [[' in files[sorted(files)[1]]  # one table row per line
    second = _run(pytester, *checkpoints)
    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(["*2 snapshots passed*"])


def test_a_missing_snapshot_fails_and_the_verdict_says_how_to_record_it(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    qwen3, llama = checkpoints
    _run(pytester, qwen3, extra=("--snapshot-update",)).assert_outcomes(passed=1)
    result = _run(pytester, qwen3, llama, extra=("--causal-lm-report=verdict.md",))  # a new target joins
    result.assert_outcomes(passed=1, failed=1)
    said = "no snapshot yet for this target (*ckpt-llama-cpu-float32].json); run --snapshot-update to record it*"
    result.stdout.fnmatch_lines([f"*{said}"])
    assert "no snapshot yet for this target" in (pytester.path / "verdict.md").read_text()
    assert not (
        pytester.path / "snaps" / "test_causal_lm_invariants" / "test_behaviour_snapshot[ckpt-llama-cpu-float32].json"
    ).exists()


def test_a_model_repo_may_have_missing_snapshots_written_and_compared_from_the_next_run(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    qwen3, llama = checkpoints
    _run(pytester, qwen3, extra=("--snapshot-update",)).assert_outcomes(passed=1)
    before = _files(pytester.path / "snaps")
    written = _run(pytester, qwen3, llama, extra=("--causal-lm-snapshot-missing=write", "-rs"))
    written.assert_outcomes(passed=1, skipped=1)
    written.stdout.fnmatch_lines(["*no snapshot yet for this target: recorded it at *ckpt-llama-cpu-float32].json*"])
    after = _files(pytester.path / "snaps")
    assert {name: after[name] for name in before} == before and len(after) == 2
    assert not list((pytester.path / "snaps").rglob("*.partial"))
    _perturb(llama)
    _run(pytester, qwen3, llama, extra=("--causal-lm-snapshot-missing=write",)).assert_outcomes(passed=1, failed=1)


def test_perturbed_weights_fail_with_a_readable_diff_and_update_rewrites_only_what_changed(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    qwen3, llama = checkpoints
    _run(pytester, qwen3, llama, extra=("--snapshot-update",)).assert_outcomes(passed=2)
    before = _files(pytester.path / "snaps")
    _perturb(llama)
    failed = _run(pytester, qwen3, llama, extra=("-vv",))  # the whole diff, as outside CI pytest truncates it
    failed.assert_outcomes(passed=1, failed=1)
    failed.stdout.fnmatch_lines(
        [
            "*causal-lm snapshot differs (* difference(s); snapshot = before, this run = now):*",
            "*- prompt plain 'Hi dog how are you?', position * after '*': *was*now*",
            "*Run pytest with --snapshot-update to accept the new behaviour.*",
        ]
    )
    updated = _run(pytester, qwen3, llama, extra=("--snapshot-update",))
    updated.assert_outcomes(passed=2)
    updated.stdout.fnmatch_lines(["*1 snapshot passed. 1 snapshot updated.*"])
    after = _files(pytester.path / "snaps")
    changed = [name for name in before if before[name] != after[name]]
    assert changed == ["test_causal_lm_invariants/test_behaviour_snapshot[ckpt-llama-cpu-float32].json"]


def test_a_greedy_divergence_at_a_near_tie_is_reported_not_failed(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    qwen3 = checkpoints[0]
    _run(pytester, qwen3, extra=("--snapshot-update",)).assert_outcomes(passed=1)
    path = next((pytester.path / "snaps").rglob("*.json"))
    record = json.loads(path.read_text())
    greedy = record["prompts"][0]["greedy"]
    greedy["ids"][3] = greedy["ids"][3] + 1  # the stored run "chose" another token at step 3 ...
    greedy["margins"][3] = 0.0  # ... where the top two were tied
    path.write_text(json.dumps(record))
    result = _run(pytester, qwen3, extra=("-W", "always"))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*NearTieWarning: causal-lm snapshot: greedy continuation of plain 'Hi dog how are you?' diverges at step 3*near-tie*"
        ]
    )


def test_compare_records_names_logprob_drift_beyond_the_stored_tolerance() -> None:
    row = {"text": "Hi", "top": [["a", 1, -1.0], ["b", 2, -2.0]]}
    old = {
        "tolerance": {"logprob": 0.001},
        "facts": {"vocab_size": 10},
        "prompts": [
            {
                "prompt": "p",
                "input_ids": [5],
                "greedy": {"ids": [1], "text": "a", "margins": [1.0]},
                "next_tokens": [row],
            }
        ],
    }
    new = json.loads(json.dumps(old))
    new["prompts"][0]["next_tokens"][0]["top"][1][2] = -2.01
    problems, notes = compare_records(old, new)
    assert notes == []
    assert problems == [
        "prompt p, position 0 after 'Hi': log-probability of 'b' (id 2) was -2.0, now -2.01 (difference 0.01 > tolerance 0.001)"
    ]
    new["prompts"][0]["next_tokens"][0]["top"][1][2] = -2.0005
    new["facts"]["vocab_size"] = 12
    assert compare_records(old, new) == (["fact vocab_size: was 10, now 12"], [])


def test_the_example_model_repo_keeps_snapshots_for_its_checkpoint(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True)
    first = pytester.runpytest("--snapshot-update", "-k", "snapshot or my_prompts")
    first.assert_outcomes(passed=2)
    assert sorted(p.name for p in (pytester.path / "snapshots").rglob("*.json")) == [
        "test_behaviour_snapshot[tiny-qwen3-cpu-float32].json",
        "test_my_prompts[tiny-qwen3-cpu-float32].json",
    ]
    pytester.runpytest("-k", "snapshot or my_prompts").assert_outcomes(passed=2)


def test_a_divergence_between_tokens_that_decode_alike_shows_their_ids() -> None:
    def record(ids: list[int], text: str) -> dict:
        greedy = {"ids": ids, "text": text, "margins": [5.0] * len(ids)}
        return {"prompts": [{"prompt": "p", "input_ids": [5], "greedy": greedy, "next_tokens": []}]}

    problems, _ = compare_records(record([7, 300, 8], "x\ufffddefic"), record([7, 301, 8], "x\ufffddefic"))
    assert problems == [
        "greedy continuation of p diverges at step 1: was 'x\ufffddefic', now 'x\ufffddefic' "
        "(ids from step 1: was [300, 8], now [301, 8]) (top-two margin 5 > tolerance 0)"
    ]
    problems, _ = compare_records(record([7, 9], "a dog"), record([7, 10], "a cat"))
    assert "ids from step" not in problems[0]


def test_updating_one_target_leaves_the_snapshots_of_targets_not_run_byte_for_byte(
    pytester: pytest.Pytester, checkpoints: tuple[Path, Path]
) -> None:
    qwen3, llama = checkpoints
    third = _copy(qwen3, pytester.path / "ckpt-third")
    _run(pytester, qwen3, llama, third, extra=("--snapshot-update",)).assert_outcomes(passed=3)
    before = {p: p.read_bytes() for p in (pytester.path / "snaps").rglob("*.json")}
    assert len(before) == 3
    _perturb(llama)
    updated = _run(pytester, llama, extra=("--snapshot-update",))
    updated.assert_outcomes(passed=1)
    assert "Deleted" not in updated.stdout.str() and "unused" not in updated.stdout.str()
    after = {p: p.read_bytes() for p in (pytester.path / "snaps").rglob("*.json")}
    assert sorted(after) == sorted(before)
    changed = sorted(p.name for p in before if before[p] != after[p])
    assert changed == ["test_behaviour_snapshot[ckpt-llama-cpu-float32].json"]
    # nor a plain run of one target, nor one whose load fails: what was not run is not unused
    plain = _run(pytester, qwen3)
    plain.assert_outcomes(passed=1)
    assert "unused" not in plain.stdout.str()
    shutil.rmtree(third)
    _run(pytester, third, extra=("--snapshot-update",))
    assert {p: p.read_bytes() for p in (pytester.path / "snaps").rglob("*.json")} == after
