"""The built-in suite on tiny random checkpoints of many transformers architectures: no false failures.

A quick set runs by default; every architecture verified so far runs with
`pytest -m architecture_matrix` (see the README for the list and each one's skips).
"""

from __future__ import annotations

import re

import pytest

QUICK = ["gpt2", "mistral", "gemma2", "phi3", "bloom", "mamba", "mixtral", "gpt_neox", "opt", "starcoder2"]

VERIFIED = [
    "afmoe",
    "apertus",
    "arcee",
    "aria_text",
    "beam",
    "bert",
    "bert-generation",
    "biogpt",
    "bitnet",
    "bloom",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "ctrl",
    "diffllama",
    "electra",
    "ernie4_5",
    "ernie4_5_moe",
    "exaone4",
    "exaone_moe",
    "falcon_mamba",
    "flex_olmo",
    "flint",
    "fuyu",
    "gemma",
    "gemma2",
    "gemma3_text",
    "glm",
    "glm4",
    "glm4_moe",
    "gpt-sw3",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "gpt_neox_japanese",
    "gpt_oss",
    "granite",
    "granite_swa",
    "granitemoe",
    "granitemoe_swa",
    "granitemoeshared",
    "helium",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v3",
    "hyperclovax",
    "internlm3",
    "iquestcoder",
    "jais2",
    "jetmoe",
    "kolibri1",
    "laguna",
    "lfm2",
    "lfm3",
    "llama",
    "llama4_text",
    "mamba",
    "mellum",
    "minimax_m2",
    "minimax_m3_vl_text",
    "ministral",
    "ministral3",
    "mistral",
    "mixtral",
    "nanochat",
    "nemotron",
    "olmo",
    "olmo2",
    "olmo3",
    "olmo_hybrid",
    "olmoe",
    "openai-gpt",
    "opt",
    "persimmon",
    "phi",
    "phi3",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_5_text",
    "qwen3_moe",
    "qwen3_next",
    "recurrent_gemma",
    "seed_oss",
    "smollm3",
    "solar_open",
    "stablelm",
    "starcoder2",
    "vaultgemma",
    "xglm",
]

# The only reasons a healthy architecture may skip an invariant.
ALLOWED_SKIPS = re.compile(
    r"has no sequence-classification class"
    r"|has no last-token linear score head"
    r"|recurrent/state-space cache"
    r"|returns no past_key_values|returns no cache"
    r"|applies (final logit soft-capping|logit scaling|output multiplier|lm_head multiplier)"
    r"|has no logits_to_keep argument"
    r"|behaviour snapshots are opt-in"
    r"|benchmarks are opt-in"
    r"|no reference configured"
)


def _run_suite(pytester: pytest.Pytester, architectures: list[str]) -> None:
    args = [f"--causal-lm-checkpoint=tiny:{name}" for name in architectures]
    result = pytester.runpytest(*args, "--causal-lm-suite=only", "-p", "no:cacheprovider", "-rs")
    reports = result.reprec.getreports("pytest_runtest_logreport")
    failures = [f"{r.nodeid}: {r.longreprtext.splitlines()[-1] if r.longreprtext else ''}" for r in reports if r.failed]
    assert not failures, "\n".join(failures)
    skips = [r.longrepr[2] for r in reports if r.skipped and isinstance(r.longrepr, tuple)]
    unexpected = sorted({reason for reason in skips if not ALLOWED_SKIPS.search(reason)})
    assert not unexpected, unexpected
    assert sum(1 for r in reports if r.passed and r.when == "call") >= 9 * len(architectures)


def test_quick_architecture_set_passes_the_built_in_suite(pytester: pytest.Pytester) -> None:
    _run_suite(pytester, QUICK)


@pytest.mark.architecture_matrix
@pytest.mark.parametrize("chunk", range(0, len(VERIFIED), 10), ids=lambda start: f"{VERIFIED[start]}..")
def test_every_verified_architecture_passes_the_built_in_suite(pytester: pytest.Pytester, chunk: int) -> None:
    _run_suite(pytester, VERIFIED[chunk : chunk + 10])
