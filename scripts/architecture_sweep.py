"""Run every invariant helper on ``tiny:<model_type>`` for transformers' causal-LM architectures.

A triage tool for the architecture matrix: prints one JSON line per
architecture with each check's outcome (ok, skip: reason, FAIL: message,
ERR: exception, or BUILD: why the tiny model could not be made).

    python scripts/architecture_sweep.py            # all (about 11 minutes on 2 cores)
    python scripts/architecture_sweep.py gpt2 xlm   # a few
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

import pytest_causal_lm as clm
from pytest_causal_lm.loading import CausalLM, load
from pytest_causal_lm.targets import Target

# every registered invariant that needs no pytest fixture (snapshots and the reference do)
CHECKS: dict[str, Callable[[CausalLM], Any]] = {i.key: i.check for i in clm.invariants() if not i.fixtures}


class _Timeout(Exception):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def sweep(name: str, seconds: int = 120) -> dict[str, Any]:
    row: dict[str, Any] = {}
    start = time.time()
    signal.alarm(seconds)
    try:
        handle = load(Target(f"tiny:{name}", "cpu", "float32"), seed=0)
        for check, run in CHECKS.items():
            try:
                run(handle)
                row[check] = "ok"
            except pytest.skip.Exception as exc:
                row[check] = "skip: " + _first_line(exc)
            except AssertionError as exc:
                row[check] = "FAIL: " + _first_line(exc)
            except _Timeout:
                raise
            except Exception as exc:
                row[check] = f"ERR: {type(exc).__name__}: {_first_line(exc)}"
    except _Timeout:
        row["build"] = "TIMEOUT"
    except Exception as exc:
        row["build"] = f"BUILD: {type(exc).__name__}: {_first_line(exc)}"
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.time() - start, 1)
    return row


def main(names: list[str]) -> None:
    hf_logging.set_verbosity_error()

    def on_alarm(*_: object) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    for name in names or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        print(json.dumps({name: sweep(name)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
