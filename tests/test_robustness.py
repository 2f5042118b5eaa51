"""Bad input, GGUF errors, device_map, pytest-xdist and memory: one short message per cause, no crashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_plugin import RUN_BY_DEFAULT, SKIPPED_BY_DEFAULT

import pytest_causal_lm as clm

FAMILIES = ("shapes", "vocab", "generation", "padding", "chat")
QUICK = ("-m", " or ".join(f"causal_lm_{family}" for family in FAMILIES))
QUICK_COUNT = len([i for i in clm.invariants() if i.marker in FAMILIES and not i.opt_in])
CHAT_COUNT = len([i for i in clm.invariants() if i.marker == "chat"])


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_corrupt_safetensors_get_one_message_and_other_checkpoints_run(
    pytester: pytest.Pytester, qwen3_path: Path
) -> None:
    broken = _copy(qwen3_path, pytester.path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = pytester.runpytest(
        f"--causal-lm-checkpoint={broken}", "--causal-lm-checkpoint=tiny:llama", "-k", "determinism"
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*cannot load *corrupt: weights of *corrupt could not be read (*). Fix: re-save or re-download them.*"]
    )


def test_a_tokenizer_without_pad_token_uses_eos_for_padding(pytester: pytest.Pytester, qwen3_path: Path) -> None:
    checkpoint = _copy(qwen3_path, pytester.path / "no-pad")
    _edit_json(checkpoint / "tokenizer_config.json", pad_token=None)
    for name in ("config.json", "generation_config.json"):
        _edit_json(checkpoint / name, pad_token_id=None)
    result = pytester.runpytest(f"--causal-lm-checkpoint={checkpoint}", *QUICK)
    result.assert_outcomes(passed=QUICK_COUNT)


def test_a_tokenizer_without_eos_still_runs_the_suite(pytester: pytest.Pytester, qwen3_path: Path) -> None:
    checkpoint = _copy(qwen3_path, pytester.path / "no-eos")
    _edit_json(checkpoint / "tokenizer_config.json", eos_token=None)
    for name in ("config.json", "generation_config.json"):
        _edit_json(checkpoint / name, eos_token_id=None)
    result = pytester.runpytest(f"--causal-lm-checkpoint={checkpoint}", *QUICK)
    # everything runs; the chat template still ends turns with <|im_end|>, and nothing stops generation there
    result.assert_outcomes(passed=QUICK_COUNT - 1, failed=1)
    result.stdout.fnmatch_lines(["*generate does not stop at '<|im_end|>' (id 2)*", "*declares no eos at all*"])


def test_a_tokenizer_without_chat_template_skips_the_chat_test_with_a_reason(
    pytester: pytest.Pytester, qwen3_path: Path
) -> None:
    checkpoint = _copy(qwen3_path, pytester.path / "no-template")
    (checkpoint / "chat_template.jinja").unlink()
    result = pytester.runpytest(
        f"--causal-lm-checkpoint={checkpoint}", "-m", "causal_lm_chat or causal_lm_generation", "-rs"
    )
    generation = sum(i.marker == "generation" for i in clm.invariants())  # they run without a template
    result.assert_outcomes(passed=generation, skipped=CHAT_COUNT)
    result.stdout.fnmatch_lines(["*the tokenizer has no chat template*"])


def test_a_missing_gguf_file_and_a_missing_gguf_package_are_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = pytester.runpytest("--causal-lm-checkpoint=models/absent.gguf", "-k", "determinism")
    missing.stdout.fnmatch_lines(["*GGUF file models/absent.gguf does not exist. Fix: check the path.*"])
    (pytester.path / "model.gguf").write_bytes(b"GGUF")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    no_package = pytester.runpytest("--causal-lm-checkpoint=model.gguf", "-k", "determinism")
    no_package.stdout.fnmatch_lines(
        ["*model.gguf is a GGUF file and needs the gguf package. Fix: pip install gguf accelerate.*"]
    )


def test_a_directory_with_several_gguf_files_asks_which(pytester: pytest.Pytester) -> None:
    (pytester.path / "quants").mkdir()
    for name in ("q4.gguf", "q8.gguf"):
        (pytester.path / "quants" / name).write_bytes(b"GGUF")
    result = pytester.runpytest("--causal-lm-checkpoint=quants", "-k", "determinism")
    result.stdout.fnmatch_lines(
        ["*checkpoint directory quants has no config.json. It holds 2 .gguf files: pass one of them*"]
    )


def test_device_map_loads_through_accelerate_and_runs_the_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_map="""
        def test_placed_by_accelerate(causal_lm):
            assert causal_lm.target.device_map == "auto"
            # accelerate places every module; on a CPU-only machine all of them land on the CPU
            placement = getattr(causal_lm.model, "hf_device_map", {"": str(causal_lm.model.device)})
            assert set(map(str, placement.values())) <= {"cpu", "0", "cuda:0"}
        """
    )
    marks = QUICK[1] + " or not (causal_lm or causal_lm_benchmark or causal_lm_reference)"  # and the test above
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-device-map=auto", "-m", marks, "-v")
    result.assert_outcomes(passed=QUICK_COUNT + 1)
    result.stdout.fnmatch_lines(["*test_placed_by_accelerate?tiny-qwen3-map-auto-float32? PASSED*"])


def test_models_are_released_after_their_last_test_and_never_reloaded(pytester: pytest.Pytester) -> None:
    checkpoints = [f"--causal-lm-checkpoint=tiny:{name}" for name in ("qwen3", "llama", "gpt2")]
    recorder = pytester.inline_run(*checkpoints, *QUICK)
    recorder.assertoutcome(passed=3 * QUICK_COUNT)
    cache = clm.session_of(recorder.getcall("pytest_sessionfinish").session.config).models
    assert (cache.load_count, cache.peak_held, len(cache.loaded)) == (3, 1, 0)


LOADS_PER_WORKER_PROBE = """
import os
from pathlib import Path

import pytest_causal_lm as clm


def pytest_sessionfinish(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "serial")
    Path(f"loads-{worker}.txt").write_text(str(clm.session_of(session.config).models.load_count))
"""


def test_xdist_gives_the_serial_results_with_one_load_per_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(load_probe=LOADS_PER_WORKER_PROBE)
    args = (
        "-p",
        "load_probe",
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-checkpoint=tiny:llama",
        "-p",
        "no:cacheprovider",
    )
    serial = pytester.runpytest_subprocess(*args)
    parallel = pytester.runpytest_subprocess(*args, "-n", "2")
    expected = {"passed": 2 * RUN_BY_DEFAULT, "skipped": 2 * SKIPPED_BY_DEFAULT}
    serial.assert_outcomes(**expected)
    parallel.assert_outcomes(**expected)
    parallel.stdout.fnmatch_lines(
        ["*causal-lm verdict*", "tiny-qwen3-cpu-float32  ok   skip ok*", "tiny-llama-cpu-float32  ok   skip ok*"]
    )
    loads = {p.name: int(p.read_text()) for p in pytester.path.glob("loads-gw*.txt")}
    assert sorted(loads) == ["loads-gw0.txt", "loads-gw1.txt"]
    assert all(count <= 2 for count in loads.values()), loads  # each worker loads each checkpoint at most once


def test_an_unreachable_hub_fails_fast_and_a_cached_hub_id_loads_from_the_cache(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, qwen3_path: Path
) -> None:
    # the Hub at a local port nothing listens on: refused at once, no download can happen
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    missing = pytester.runpytest_subprocess("--causal-lm-checkpoint=some-org/not-cached", "-k", "determinism")
    missing.assert_outcomes(errors=1)
    missing.stdout.fnmatch_lines(
        [
            "*some-org/not-cached is not in the local Hugging Face cache and the Hub cannot be reached*"
            "If you meant a local folder: there is no some-org/not-cached in *"
        ]
    )
    assert "Retrying" not in missing.stdout.str() + missing.stderr.str()
    snapshot = pytester.path / "hf-home" / "hub" / "models--some-org--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(qwen3_path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    cached = pytester.runpytest_subprocess("--causal-lm-checkpoint=some-org/cached", "-k", "determinism")
    cached.assert_outcomes(passed=1)


def test_a_folder_with_only_config_json_names_every_missing_part(pytester: pytest.Pytester, qwen3_path: Path) -> None:
    (pytester.path / "bare").mkdir()
    shutil.copy(qwen3_path / "config.json", pytester.path / "bare" / "config.json")
    result = pytester.runpytest("--causal-lm-checkpoint=bare", "-k", "determinism")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*checkpoint directory bare has config.json but no weights (*.safetensors, *) and no tokenizer files (*"]
    )
