"""A hand-written static-cache + torch.compile greedy decode loop: the yardstick of the plugin's
``static_compiled`` mode (benchmarks/test_reference_loop.py compares the two in one run).

No generate, no plugin: a StaticCache, one eager prefill, then one compiled decoding step per token, with
positions passed as tensors so the compiled graph is reused.

    python benchmarks/reference_loop.py CHECKPOINT [NEW_TOKENS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_steps(model, prompt: torch.Tensor, new_tokens: int, step) -> tuple[list[int], list[float]]:
    """Greedy tokens and the wall time of each decoding step after the prefill."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    with torch.no_grad():
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens, times = [int(token)], []
        for position in range(prompt.shape[1], prompt.shape[1] + new_tokens - 1):
            start = time.perf_counter()
            token = step(model, token, torch.tensor([[position]], device=prompt.device), cache)
            tokens.append(int(token))  # the copy to the host waits for the step, as a user's loop would
            times.append(time.perf_counter() - start)
    return tokens, times


def _step(model, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    logits = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def compiled_step(device: torch.device):
    """The decoding step under torch.compile: reduce-overhead (CUDA graphs) on CUDA, default elsewhere."""
    return torch.compile(_step, mode="reduce-overhead" if device.type == "cuda" else "default")


def reference_decode_seconds(
    model, prompt: torch.Tensor, new_tokens: int, rounds: int = 5, warmup: int = 2
) -> tuple[list[int], float]:
    """``(tokens, median seconds per decoding step)`` over ``rounds`` timed runs after ``warmup`` (compiling)."""
    step = compiled_step(prompt.device)
    for _ in range(warmup):
        decode_steps(model, prompt, new_tokens, step)
    runs = [decode_steps(model, prompt, new_tokens, step) for _ in range(rounds)]
    return runs[-1][0], statistics.median(t for _, times in runs for t in times)


if __name__ == "__main__":
    checkpoint, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(100, 1000, (1, 32))
    _, seconds = reference_decode_seconds(lm, ids, count)
    print(f"reference static-cache + compiled loop: {1 / seconds:.1f} tokens/s ({seconds * 1e3:.2f} ms/step)")
