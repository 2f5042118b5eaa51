"""Tiny checkpoints built once per test session into a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pytester's in-process runs drop modules first imported inside them; importing the
# heavy ones here keeps torch's C extension and transformers' model classes loaded once.
import torch
import transformers

from pytest_causal_lm.loading import CausalLM, Target, load
from pytest_causal_lm.tiny import materialize

# One intra-op thread: the tests' models are tiny, and on 2 cores shared with a second busy process two
# threads wait on each other (measured: 69 s with two threads, 23 s with one, for the checks' tests under load).
# The environment variable carries it to the pytester subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

for _name in ("Qwen3ForCausalLM", "LlamaForCausalLM", "PreTrainedTokenizerFast", "DynamicCache", "GenerationConfig"):
    getattr(transformers, _name)


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
