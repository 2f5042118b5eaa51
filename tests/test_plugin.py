"""The plugin seen from the command line: options, header, ids, skips, loading, suite collection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pytest_causal_lm as clm

FLOAT32_SKIPS = 1  # test_dtype_parity: a float32 run of a checkpoint stored in float32 has no other dtype
NO_BOUNDARY_SKIPS = 1  # test_long_context: the tiny checkpoints and SmolLM2 declare no sliding window or RoPE scaling
RANDOM_WEIGHT_SKIPS = 1  # test_knows_language: tiny checkpoints (and test fixtures) have random weights on purpose
_HEALTHY_SKIPS = FLOAT32_SKIPS + NO_BOUNDARY_SKIPS + RANDOM_WEIGHT_SKIPS
RUN_BY_DEFAULT = len([i for i in clm.invariants() if not i.opt_in]) - _HEALTHY_SKIPS
SKIPPED_BY_DEFAULT = len([i for i in clm.invariants() if i.opt_in]) + _HEALTHY_SKIPS

USER_TEST = """
def test_uses_fixtures(causal_lm, causal_lm_model, causal_lm_tokenizer):
    assert causal_lm.model is causal_lm_model
    assert causal_lm.tokenizer is causal_lm_tokenizer
    assert causal_lm.tolerance.atol > 0
"""


def test_help_lists_every_option_with_its_ini_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    assert "causal language model invariants (pytest-causal-lm)" in out
    for option in (
        "checkpoint",
        "revision",
        "device",
        "dtype",
        "trust-remote-code",
        "attn-implementation",
        "suite",
        "atol",
        "rtol",
        "seed",
    ):
        assert f"--causal-lm-{option}" in out
        assert f"causal_lm_{option.replace('-', '_')} " in out  # the ini key, in the [pytest] ini-options list


def test_plugin_import_and_help_leave_torch_unimported(tmp_path: Path) -> None:
    code = (
        "import sys, pytest, pytest_causal_lm, pytest_causal_lm.plugin\n"
        "assert pytest.main(['--help', '-p', 'no:cacheprovider']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers', 'hypothesis') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "families = sorted(m for m in sys.modules if m.startswith('pytest_causal_lm.checks.') and '._' not in m)\n"
        "print('FAMILIES', families)\n"
    )
    # from an empty directory: this project's own conftest imports torch on purpose
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "HEAVY []" in result.stdout
    # nor a check module: pytest re-parses each module a plugin imports on every run without cached bytecode
    assert "FAMILIES []" in result.stdout, result.stdout


def test_each_check_name_is_imported_from_its_module_on_first_use() -> None:
    """``pytest_causal_lm.checks`` lists where each name lives for run time, and imports them for type checkers:
    the two must agree, and every name must resolve."""
    import ast
    import importlib

    from pytest_causal_lm import checks

    tree = ast.parse(Path(checks.__file__).read_text(encoding="utf-8"))
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    imported = {
        alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert imported == checks._HOMES
    for name, module in imported.items():  # by name: other tests re-import the package's modules
        assert getattr(checks, name).__name__ == name
        assert hasattr(importlib.import_module(f"pytest_causal_lm.checks.{module}"), name)
    assert set(checks.__all__) <= set(dir(checks))


def test_without_a_checkpoint_fixture_tests_skip_with_a_reason_and_no_suite_is_collected(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no causal LM checkpoint configured: pass --causal-lm-checkpoint=CKPT*"])


def test_ids_are_checkpoint_x_device(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "--causal-lm-checkpoint=tiny:llama",
        "--causal-lm-device=cpu",
        "--causal-lm-suite=off",
        "-v",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(
        ["*test_uses_fixtures?tiny-qwen3-cpu-float32? PASSED*", "*test_uses_fixtures?tiny-llama-cpu-float32? PASSED*"]
    )


def test_a_device_asked_for_by_name_that_is_missing_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    missing = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-device=cpu", "--causal-lm-device=cuda:7"
    )
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(
        ["ERROR: --causal-lm-device=cuda:7: device cuda:7 unavailable: *. Use --causal-lm-device=auto to fall back"]
    )
    assert len(missing.stderr.lines) <= 2
    fallback = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-device=auto", "--causal-lm-suite=off"
    )
    fallback.assert_outcomes(passed=1)


@pytest.mark.parametrize("value", ["", " ", ","])
def test_an_empty_checkpoint_is_a_usage_error(pytester: pytest.Pytester, value: str) -> None:
    result = pytester.runpytest(f"--causal-lm-checkpoint={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --causal-lm-checkpoint: empty value; pass one, e.g. --causal-lm-checkpoint=*"])


def test_settings_come_from_option_env_and_ini_and_the_header_says_which(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        causal_lm_checkpoint = ["tiny:llama"]
        causal_lm_device = ["cpu"]
        causal_lm_atol = "0.001"
        """
    )
    pytester.makepyfile(
        test_user="""
        def test_settings(causal_lm):
            assert causal_lm.target.dtype == "bfloat16"
            assert causal_lm.dtype == "bfloat16"
            assert causal_lm.tolerance.atol == 0.001
            assert causal_lm.tolerance.rtol == 0.02  # bfloat16 row of the table
        """
    )
    monkeypatch.setenv("CAUSAL_LM_DTYPE", "bfloat16")
    result = pytester.runpytest("--causal-lm-suite=off", "--causal-lm-seed=3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "causal-lm: checkpoint=tiny:llama (ini), device=cpu (ini), dtype=bfloat16 (env), suite=off (option), "
            "atol=0.001 (ini), seed=3 (option)"
        ]
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--causal-lm-dtype=float8"], {}, "*argument --causal-lm-dtype: invalid choice: 'float8'*"),
        (
            [],
            {"CAUSAL_LM_DTYPE": "half"},
            "*invalid choice 'half' (from env); choose from float32, bfloat16, float16, auto*",
        ),
        (
            ["--causal-lm-device=gpu"],
            {},
            "*invalid device 'gpu' (from option); choose from auto, cpu, cuda, cuda:N, mps*",
        ),
        ([], {"CAUSAL_LM_SEED": "x"}, "*environment variable CAUSAL_LM_SEED: invalid value for seed*"),
    ],
)
def test_invalid_values_are_usage_errors_listing_the_choices(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_each_checkpoint_is_loaded_once_however_many_tests_use_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    loads: list[str] = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        loads.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    pytester.makepyfile(test_user=USER_TEST + "\n\ndef test_again(causal_lm_model):\n    pass\n")
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-checkpoint=tiny:llama", "-q")
    result.assert_outcomes(passed=2 * (2 + RUN_BY_DEFAULT), skipped=2 * SKIPPED_BY_DEFAULT)
    assert len(loads) == 2, loads


def test_a_checkpoint_that_cannot_load_gets_one_short_message_and_the_others_still_run(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest("--causal-lm-checkpoint=./no/such/model", "--causal-lm-checkpoint=tiny:qwen3")
    others = len(clm.invariants()) - 1
    result.assert_outcomes(passed=RUN_BY_DEFAULT, errors=1, skipped=SKIPPED_BY_DEFAULT + others)
    message = "cannot load ./no/such/model: checkpoint path ./no/such/model does not exist. Fix: check the path."
    failures = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed and r.when == "setup"]
    assert [r.longreprtext for r in failures] == [message]  # the whole report: no traceback
    assert "Traceback" not in result.stdout.str()


def test_a_directory_without_config_json_is_named(pytester: pytest.Pytester) -> None:
    (pytester.path / "weights").mkdir()
    result = pytester.runpytest("--causal-lm-checkpoint=weights", "-k", "shapes and not keep")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*checkpoint directory weights has no config.json. Fix: pass the directory written by*"]
    )


def test_suite_off_keeps_the_fixtures_and_markers_select_invariants(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    off = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=off")
    off.assert_outcomes(passed=1)
    selected = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "-m", "causal_lm_causality", "-v")
    selected.assert_outcomes(passed=1)
    selected.stdout.fnmatch_lines(["*test_prefix_causality?tiny-qwen3-cpu-float32? PASSED*"])
    by_name = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "-k", "determinism", "--co", "-q")
    by_name.stdout.fnmatch_lines(["*test_causal_lm_invariants.py::test_determinism?tiny-qwen3-cpu-float32?"])


LEAKY_MODELING = '''
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


class LeakyQwen3Config(Qwen3Config):
    model_type = "leaky_qwen3"


class LeakyQwen3ForCausalLM(Qwen3ForCausalLM):
    """Custom modeling code with an off-by-one causal mask: position i also sees i + 1."""

    config_class = LeakyQwen3Config

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        if input_ids is not None and past_key_values is None:
            n = input_ids.shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril(diagonal=1)
            attention_mask = {"full_attention": allowed[None, None].expand(input_ids.shape[0], 1, n, n)}
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
'''


@pytest.fixture
def leaky_checkpoint(pytester: pytest.Pytester, qwen3_path: Path) -> Path:
    target = pytester.path / "leaky-qwen3"
    shutil.copytree(qwen3_path, target)
    (target / "modeling_leaky.py").write_text(LEAKY_MODELING)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "leaky_qwen3"
    config["auto_map"] = {
        "AutoConfig": "modeling_leaky.LeakyQwen3Config",
        "AutoModelForCausalLM": "modeling_leaky.LeakyQwen3ForCausalLM",
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_built_in_suite_fails_a_custom_code_checkpoint_with_a_leaky_mask(
    pytester: pytest.Pytester, leaky_checkpoint: Path
) -> None:
    result = pytester.runpytest(
        f"--causal-lm-checkpoint={leaky_checkpoint}", "--causal-lm-trust-remote-code", "--causal-lm-random-weights"
    )
    # the leak breaks causality, and through it every comparison of a cached path with the full forward
    # (cache parity, static cache, greedy parity, continuation, assisted decoding, beam and sampling scores
    # against a plain forward), padding invariance, the training step's right-padded batch (real tokens see the
    # padding after them) and eager against sdpa; forward(**kwargs) hides logits_to_keep and inputs_embeds and
    # the custom class has no classifier: those three skip. It replaces any mask with its own, so transformers
    # never detects packing (a note) and a 4D mask it accepts is ignored (a failure). The long prefill's chunks
    # end where the full forward's positions see one token more
    result.assert_outcomes(passed=RUN_BY_DEFAULT - 16, failed=13, skipped=3 + SKIPPED_BY_DEFAULT)
    result.stdout.fnmatch_lines(
        [
            "*test_prefix_causality?leaky-qwen3-cpu-float32?*",
            "E * prefix causality violated: scores at position * changed after *",
            "*checkpoint * : *leaky-qwen3 (device cpu, dtype float32)",
        ]
    )


def test_custom_code_without_the_flag_says_how_to_allow_it(pytester: pytest.Pytester, leaky_checkpoint: Path) -> None:
    result = pytester.runpytest(f"--causal-lm-checkpoint={leaky_checkpoint}", "-k", "determinism")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*needs its own modeling code (trust_remote_code). Fix: review the code, then pass --causal-lm-trust-remote-code.*"
        ]
    )


@pytest.mark.parametrize(("page", "tests"), [("README.md", 1), ("docs/model-repo.md", 2)])
def test_the_model_repo_examples_in_the_docs_run(pytester: pytest.Pytester, page: str, tests: int) -> None:
    """The README's and the docs' model-repo examples, verbatim, on a tiny checkpoint."""
    text = (Path(__file__).parents[1] / page).read_text()
    block = text.split("# tests/test_my_model.py", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    pytester.makepyfile(test_my_model=textwrap.dedent(block))
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:llama", "--causal-lm-suite=off", "-q")
    result.assert_outcomes(passed=tests)


def test_suite_only_runs_the_built_in_suite_without_the_projects_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_mine():\n    raise AssertionError('must not run')\n")
    result = pytester.runpytest("--causal-lm-checkpoint=tiny:qwen3", "--causal-lm-suite=only")
    result.assert_outcomes(passed=RUN_BY_DEFAULT, skipped=SKIPPED_BY_DEFAULT)


def test_a_hub_id_while_offline_says_so_and_how_to_fix_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time: needs a fresh process
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf-home"))
    result = pytester.runpytest_subprocess("--causal-lm-checkpoint=Qwen/Qwen3-0.6B", "-k", "determinism")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*cannot load Qwen/Qwen3-0.6B: Qwen/Qwen3-0.6B is not in the local Hugging Face cache and the Hub "
            "cannot be reached (offline, HF_HUB_OFFLINE=1 or no network). Fix: download it first*"
        ]
    )


def test_a_checkpoint_without_tokenizer_files_names_the_tokenizer(pytester: pytest.Pytester, qwen3_path: Path) -> None:
    target = pytester.path / "no-tokenizer"
    target.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(qwen3_path / name, target / name)
    result = pytester.runpytest(f"--causal-lm-checkpoint={target}", "-k", "determinism")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*cannot load *no-tokenizer: checkpoint directory *no-tokenizer has config.json but no tokenizer files "
            "(tokenizer.json, *). Fix: write what is missing with model.save_pretrained(dir) / tokenizer.save_pretrained(dir)."
        ]
    )


def test_a_failing_invariant_shows_its_own_message_first_and_the_plugin_frames_only_under_tb_long(
    pytester: pytest.Pytester, leaky_checkpoint: Path
) -> None:
    args = (f"--causal-lm-checkpoint={leaky_checkpoint}", "--causal-lm-trust-remote-code", "-k", "prefix_causality")
    lines = pytester.runpytest(*args).stdout.lines
    header = next(i for i, line in enumerate(lines) if "test_prefix_causality[" in line and line.startswith("_"))
    end = next(i for i, line in enumerate(lines) if i > header and "causal-lm" in line)
    block = [line for line in lines[header + 1 : end] if line.strip()]
    assert block[0].startswith("E   AssertionError: prefix causality violated"), block[:3]
    assert len(block) <= 25, "\n".join(block)
    assert not any("registry.py" in line or "builtin.py" in line for line in block)
    long = pytester.runpytest(*args, "--tb=long").stdout.str()
    assert "pytest_causal_lm/registry.py" in long


def test_the_suite_installed_in_the_repositorys_own_venv_is_still_collected(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uv's and poetry's layout: the package lives in ./.venv, which pytest's recursion skips."""
    site = pytester.path / ".venv" / "lib" / "python3" / "site-packages"
    shutil.copytree(Path(clm.__file__).parent, site / "pytest_causal_lm", ignore=shutil.ignore_patterns("__pycache__"))
    (pytester.path / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (site / "other_package").mkdir()
    (site / "other_package" / "test_not_ours.py").write_text("def test_other():\n    assert False\n")
    pytester.makepyfile(test_mine="def test_mine():\n    assert True\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    result = pytester.runpytest_subprocess("--causal-lm-checkpoint=tiny:qwen3", "-k", "determinism or mine", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*.venv/lib/python3/site-packages/pytest_causal_lm/suite/test_causal_lm_invariants.py::test_determinism*PASSED*",
            "*test_mine.py::test_mine PASSED*",
        ]
    )


IGNORING_PLUGIN = """
def pytest_ignore_collect(collection_path):
    if collection_path.name == "test_causal_lm_invariants.py":
        return True
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_configured_suite_that_collected_nothing_fails_saying_so(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: list[str]
) -> None:
    pytester.makepyfile(ignoresuite=IGNORING_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    result = pytester.runpytest_subprocess("-p", "ignoresuite", "--causal-lm-checkpoint=tiny:qwen3", *xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "the built-in suite (suite=on) collected no test from" in result.stdout.str() + result.stderr.str()


BIASED_HEAD_CONFTEST = '''
import pytest
import torch


@pytest.fixture(autouse=True)
def _lm_head_given_a_bias(causal_lm):
    """A port that gives lm_head a bias the sequence-classification head does not carry."""
    head = causal_lm.model.lm_head
    if head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        with torch.no_grad():
            head.bias[0] = 1.0
'''


def _failure_block(lines: list[str], test: str) -> list[str]:
    """The non-blank lines pytest prints under ``test``'s failure header."""
    header = next(i for i, line in enumerate(lines) if f"{test}[" in line and line.startswith("_"))
    return [line for line in lines[header + 1 :] if line.strip()]


def test_the_classification_head_failure_leads_with_its_message_not_the_models_repr(
    pytester: pytest.Pytester, llama_path: Path
) -> None:
    pytester.makeconftest(BIASED_HEAD_CONFTEST)
    result = pytester.runpytest(f"--causal-lm-checkpoint={llama_path}", "-k", "classification_head")
    result.assert_outcomes(failed=1)
    lines = result.stdout.lines
    block = _failure_block(lines, "test_classification_head")[:12]
    assert block[0].startswith("E   AssertionError: classification head is not equivalent to the causal LM"), block
    assert any("greatest |difference| : 1 at row 0" in line for line in block), block
    assert not any("LlamaForCausalLM(" in line or "def " in line for line in lines), result.stdout.str()


UNSHIFTED_LOSS_CONFTEST = '''
import pytest
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def _loss_without_shift(causal_lm):
    """A port whose loss scores position t against label t; the check raises from a frame inside a comprehension."""
    model = causal_lm.model
    if getattr(model, "_ported", False):
        return
    original = model.forward

    def forward(*args, labels=None, **kwargs):
        out = original(*args, **kwargs)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return out

    model.forward, model._ported = forward, True
'''


def test_a_failure_raised_deep_inside_a_check_still_leads_with_its_message(
    pytester: pytest.Pytester, llama_path: Path
) -> None:
    pytester.makeconftest(UNSHIFTED_LOSS_CONFTEST)
    result = pytester.runpytest(f"--causal-lm-checkpoint={llama_path}", "-k", "training_step")
    result.assert_outcomes(failed=1)
    lines = result.stdout.lines
    block = _failure_block(lines, "test_training_step")
    assert block[0].startswith("E   AssertionError: training step: the loss from labels="), block[:3]
    assert not any("LlamaForCausalLM(" in line or "training.py" in line for line in lines), result.stdout.str()
