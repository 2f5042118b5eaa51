"""One rank of the tensor-parallel invariant, started by ``torch.distributed.run`` (never imported by the plugin).

``python -m torch.distributed.run --nproc-per-node=N -m pytest_causal_lm.tp_worker WORKDIR``: loads
``WORKDIR/request.json``'s checkpoint with ``tp_plan="auto"`` (transformers initialises the process group: gloo
on CPU, nccl on GPUs), runs the probes, and rank 0 writes ``probes.pt``. A request with ``record`` (sent only
after a failure) replays that one probe with every module's output recorded instead. A failure writes
``error-rankR.txt``: the module the forward was in (forward pre-hooks follow it) and the error, in one line.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any


def _load(request: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    import transformers

    kwargs = dict(request["kwargs"])
    kwargs["dtype"] = getattr(torch, request["dtype"])
    try:
        from transformers.distributed.configuration_utils import DistributedConfig
    except ImportError:
        DistributedConfig = None
    if DistributedConfig is not None and "tp_plan" in inspect.signature(DistributedConfig).parameters:
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    else:  # before 5.1x the standalone argument (deprecated since, in favour of DistributedConfig)
        kwargs["tp_plan"] = "auto"
    tokenizer = transformers.AutoTokenizer.from_pretrained(request["location"], **request["kwargs"])
    model = transformers.AutoModelForCausalLM.from_pretrained(request["location"], **kwargs).eval()
    return model, tokenizer


def _recorded(model: Any, tokenizer: Any, asked: dict[str, Any]) -> dict[str, Any]:
    """Every module's output at the asked probe position, as plain data: ``{name: (class, output, input)}``."""
    from pytest_causal_lm.checks._localise import record
    from pytest_causal_lm.checks._probes import probe_side

    side = probe_side(model, tokenizer, asked["probe"], asked["row"], asked["position"], "tensor parallel")
    trace = record(side, model, [asked["position"]])
    return {"trace": trace.as_plain()}


def main(work: Path) -> int:
    rank = int(os.environ.get("RANK", "0"))
    where = ["loading"]
    try:
        from pytest_causal_lm.checks._probes import follow_modules, parity_probes

        model, tokenizer = _load(json.loads((work / "request.json").read_text()))
        model.requires_grad_(False)
        where[0] = "the first forward"
        follow_modules(model, where)
        request = json.loads((work / "request.json").read_text())
        probes = (
            _recorded(model, tokenizer, request["record"]) if "record" in request else parity_probes(model, tokenizer)
        )
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        (work / f"error-rank{rank}.txt").write_text(f"rank {rank}, in {where[0]}: {type(exc).__name__}: {text}")
        return 1
    if rank == 0:
        import torch

        torch.save(probes, work / "probes.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
