"""The two Python steps of benchmarks/gpu_check.sh: build a checkpoint from a real config with random weights,
and fold the run's reports into one JSON and one Markdown summary.

    python benchmarks/gpu_check.py build OUT_DIR [--shape qwen3-8b|tiny] [--device cuda]
    python benchmarks/gpu_check.py summarize OUT_DIR

No network: the tokenizer is the built-in tiny:qwen3 one (trained offline); the vocabulary of the config is
larger than the tokenizer's, as padded vocabularies of real checkpoints are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Qwen3-8B's config.json (the fields that shape the model), so the checkpoint is that model's size and layout.
QWEN3_8B = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# The same layout at a size a CPU runs in seconds: the dry run of the script in the project's tests.
TINY = {**QWEN3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY.update(num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=2048)
SHAPES = {"qwen3-8b": QWEN3_8B, "tiny": TINY}


def build(out: Path, shape: str, device: str) -> dict[str, Any]:
    """Random bfloat16 weights for ``shape``, saved with ``save_pretrained`` next to the tiny:qwen3 tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pytest_causal_lm.tiny import materialize

    start = time.perf_counter()
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(materialize("tiny:qwen3"))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "parameters": parameters, "seconds": round(time.perf_counter() - start, 1)}


def _suite(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    (target,) = report["targets"].values()
    return {
        "load_error": target.get("load_error"),
        "device_name": target.get("device_name"),
        "invariants": {
            key: {
                "outcome": cell["outcome"],
                "figure": cell["figure"],
                "atol": (cell.get("tolerance") or {}).get("atol"),
                "noise": (cell.get("tolerance") or {}).get("noise"),
                "detail": cell.get("detail", "")[:200],
            }
            for key, cell in target["invariants"].items()
        },
    }


def _benchmarks(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [
        {"name": b["name"], "median_s": b["stats"]["median"], **_scalars(b.get("extra_info", {}))}
        for b in data.get("benchmarks", [])
    ]


def _scalars(info: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in info.items() if isinstance(value, (int, float, str)) and len(str(value)) < 80}


def summarize(out: Path) -> dict[str, Any]:
    """One JSON (``summary.json``) and one Markdown (``summary.md``) from what the run left in ``out``."""
    phases = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines() if line.strip()]
    summary = {
        "phases": phases,
        "build": json.loads((out / "build.json").read_text()) if (out / "build.json").exists() else None,
        "suite": {dtype: _suite(out / f"suite-{dtype}.json") for dtype in ("bfloat16", "float16")},
        "benchmark": _benchmarks(out / "benchmark.json"),
        "reference_loop": _benchmarks(out / "reference-loop.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["# GPU check", "", "| phase | exit | seconds |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['exit']} | {p['seconds']} |" for p in summary["phases"]]
    if summary["build"]:
        lines += ["", f"Checkpoint: {summary['build']['shape']}, {summary['build']['parameters']:,} parameters."]
    for dtype, suite in summary["suite"].items():
        lines += ["", f"## Suite in {dtype}", ""]
        if suite is None:
            lines.append("no report (the phase did not finish)")
            continue
        lines += [f"device: {suite['device_name']}", "", "| invariant | outcome | figure | atol | noise floor |"]
        lines.append("|---|---|---|---|---|")
        for key, cell in suite["invariants"].items():
            figure = f"{cell['figure']['label']} {cell['figure']['value']:.3g}" if cell["figure"] else ""
            lines.append(f"| {key} | {cell['outcome']} | {figure} | {cell['atol'] or ''} | {cell['noise'] or ''} |")
    for title, rows in (("Benchmark", summary["benchmark"]), ("Hand-written loop", summary["reference_loop"])):
        lines += ["", f"## {title}", ""]
        lines += [f"- {row['name']}: median {row['median_s']:.4g} s {_short(row)}" for row in rows] or ["no results"]
    return "\n".join(lines) + "\n"


# what a reader compares first; a row without them (the hand-written loop's) shows its first few figures
_FIRST = ("mode", "prompt_length", "new_tokens", "tokens_per_second", "ttft_seconds", "itl_p50_seconds", "unstable")


def _short(row: dict[str, Any]) -> str:
    keys = [k for k in _FIRST if k in row] or [k for k in row if k not in ("name", "median_s")][:8]
    return "(" + ", ".join(f"{k}={row[k]}" for k in keys) + ")" if keys else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "summarize"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.step == "build":
        facts = build(args.out / "checkpoint", args.shape, args.device)
        (args.out / "build.json").write_text(json.dumps(facts))
        print(json.dumps(facts))
    else:
        summarize(args.out)
        print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
