"""The suite's own cost: its wall time on a checkpoint against benchmarks/plain_probes.py, back to back.

Opt-in (the project's `pytest` collects tests/ only):

    CAUSAL_LM_TEST_COST_CHECKPOINT=path/to/checkpoint pytest benchmarks/test_suite_cost.py -s

Both run as fresh processes (imports and loading included); pytest-benchmark
records the pair, and extra_info holds both wall times, their ratio and every
invariant's time, read from the suite's JUnit XML.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

CHECKPOINT = os.environ.get("CAUSAL_LM_TEST_COST_CHECKPOINT")
PLAIN = Path(__file__).with_name("plain_probes.py")


def _timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


@pytest.mark.skipif(not CHECKPOINT, reason="set CAUSAL_LM_TEST_COST_CHECKPOINT to the checkpoint to measure")
def test_suite_cost_against_the_plain_script(benchmark, tmp_path: Path) -> None:
    junit = tmp_path / "suite.xml"
    suite = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--causal-lm-checkpoint={CHECKPOINT}"]
    suite += ["--causal-lm-suite=only", f"--junitxml={junit}"]
    times: dict[str, float] = {}

    def both() -> None:
        times["suite"] = _timed(suite, tmp_path)
        times["plain"] = _timed([sys.executable, str(PLAIN), str(CHECKPOINT)], tmp_path)

    benchmark.pedantic(both, rounds=1, iterations=1)
    per_invariant = {
        case.get("name", "").split("[")[0]: round(float(case.get("time", 0)), 2)
        for case in ElementTree.parse(junit).iter("testcase")
    }
    ratio = times["suite"] / times["plain"]
    benchmark.extra_info.update(
        suite_seconds=round(times["suite"], 2), plain_seconds=round(times["plain"], 2), ratio=round(ratio, 3)
    )
    benchmark.extra_info["per_invariant_seconds"] = per_invariant
    print(f"\nsuite {times['suite']:.1f} s, plain script {times['plain']:.1f} s, ratio {ratio:.2f}")
    for name, seconds in sorted(per_invariant.items(), key=lambda item: -item[1]):
        print(f"  {name:40s} {seconds:6.2f} s")
