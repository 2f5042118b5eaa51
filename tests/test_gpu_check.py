"""benchmarks/gpu_check.sh, dry-run on CPU at a tiny size: every phase runs and the summary holds its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_check_dry_runs_on_cpu_and_writes_one_json_and_one_markdown(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GPU_CHECK_SHAPE": "tiny",
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SWEEP": "--causal-lm-benchmark-new-tokens=4 --causal-lm-benchmark-prompt-lengths=8 "
        "--causal-lm-benchmark-rounds=1 --causal-lm-benchmark-warmup-rounds=0",
        "PYTHON": sys.executable,
    }
    env.pop("PYTEST_XDIST_WORKER", None)
    out = tmp_path / "gpu-check"
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env, check=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["exit"]) for p in summary["phases"]] == [
        ("build", 0),
        ("suite-bfloat16", 0),
        ("suite-float16", 0),
        ("benchmark", 0),
    ]
    assert summary["build"]["shape"] == "tiny" and summary["build"]["parameters"] > 100_000
    for dtype, suite in summary["suite"].items():
        outcomes = {key: cell["outcome"] for key, cell in suite["invariants"].items()}
        assert outcomes["kv_cache_parity"] == outcomes["dtype_parity"] == "ok", (dtype, outcomes)
        assert not {k for k, o in outcomes.items() if o in ("FAIL", "err")}, (dtype, outcomes)
        assert suite["invariants"]["prefix_causality"]["noise"] > 0  # calibrated against float32
    modes = {row["mode"] for row in summary["benchmark"]}
    assert modes == {"no_cache", "dynamic", "static"} and all(
        row["tokens_per_second"] > 0 for row in summary["benchmark"]
    )
    markdown = (out / "summary.md").read_text()
    assert "## Suite in bfloat16" in markdown and "## Suite in float16" in markdown and "| build | 0 |" in markdown
    assert not (out / "checkpoint").exists()  # the random weights are removed; the figures stay
