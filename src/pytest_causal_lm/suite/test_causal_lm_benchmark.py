"""Cached vs uncached greedy generation, timed by pytest-benchmark (opt-in: --causal-lm-benchmark).

Each test generates exactly N new tokens, with or without the KV cache, after
warm-up rounds; the figures land in the benchmark's extra_info (and so in
--benchmark-json). It fails only if cached and uncached generation disagree.
"""

import pytest

import pytest_causal_lm as clm
from pytest_causal_lm import benchmark as bench
from pytest_causal_lm.checks.greedy import GreedyRun, compare_continuations
from pytest_causal_lm.plugin import BENCHMARK_KEY, SETTINGS_KEY

pytestmark = pytest.mark.causal_lm_benchmark


def _scores_along(model, prompt, tokens):
    """Uncached scores at every step of ``tokens``: for judging a divergence by its margin."""
    import torch

    ids = torch.cat([prompt, torch.tensor([tokens], device=prompt.device)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float().cpu()
    return list(logits)


def test_generation_speed(
    causal_lm: clm.CausalLM,
    benchmark,
    request: pytest.FixtureRequest,
    causal_lm_use_cache: bool,
    causal_lm_new_tokens: int,
) -> None:
    settings = request.config.stash[SETTINGS_KEY]
    model, tokenizer = causal_lm.model, causal_lm.tokenizer
    mode = "cached" if causal_lm_use_cache else "uncached"
    benchmark.group = f"{causal_lm.target.id} new_tokens={causal_lm_new_tokens}"
    prompt = bench.random_prompt(model, tokenizer, settings.benchmark_prompt_length, seed=causal_lm.seed)
    tokens = benchmark.pedantic(
        bench.forced_generate,
        args=(model, tokenizer, prompt, causal_lm_new_tokens, causal_lm_use_cache),
        rounds=settings.benchmark_rounds,
        warmup_rounds=1,
        iterations=1,
    )
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    seconds = benchmark.stats.stats.median
    prefill = bench.measure_prefill(model, prompt, settings.benchmark_rounds)
    measurement = bench.Measurement(
        target_id=causal_lm.target.id,
        use_cache=causal_lm_use_cache,
        new_tokens=causal_lm_new_tokens,
        prompt_length=prompt.shape[1],
        seconds=seconds,
        prefill_seconds=prefill,
        tokens=tokens,
        extra_info=benchmark.extra_info,
    )
    info = benchmark.extra_info
    info.update(
        checkpoint=causal_lm.checkpoint,
        device=causal_lm.device,
        dtype=causal_lm.dtype,
        mode=mode,
        new_tokens=causal_lm_new_tokens,
        prompt_length=prompt.shape[1],
        median_seconds=round(seconds, 6),
        prefill_seconds=round(prefill, 6),
        decode_seconds_per_token=round(measurement.decode_seconds_per_token, 6),
        tokens_per_second=round(measurement.tokens_per_second, 3),
    )
    if causal_lm_use_cache and model.device.type == "cuda":
        import torch

        moved = bench.bytes_per_decode_token(model, prompt.shape[1] + causal_lm_new_tokens / 2)
        achieved = moved / measurement.decode_seconds_per_token / 1e9
        name = torch.cuda.get_device_name(model.device)
        peak = settings.peak_bandwidth or bench.peak_bandwidth(name)
        info.update(device_name=name, achieved_bandwidth_gbps=round(achieved, 1))
        if peak:
            info.update(peak_bandwidth_gbps=peak, bandwidth_fraction=round(achieved / peak, 3))
    collector = request.config.stash[BENCHMARK_KEY]
    collector.add(measurement)
    other = collector.counterpart(measurement)
    if other is not None:
        uncached, cached = (other, measurement) if causal_lm_use_cache else (measurement, other)
        reference = GreedyRun(tokens=uncached.tokens, step_scores=_scores_along(model, prompt, uncached.tokens))
        compare_continuations(
            model,
            tokenizer,
            prompt,
            reference,
            cached.tokens,
            reference_label="without cache",
            other_label="with KV cache",
            tolerance=causal_lm.tolerance,
            title=f"cached and uncached generation disagree ({causal_lm_new_tokens} new tokens)",
        )
