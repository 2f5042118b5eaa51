"""Generation invariants: healthy tiny checkpoints pass; each broken model fails with a useful message."""

from __future__ import annotations

import re
import warnings

import broken
import pytest
import torch

import pytest_causal_lm as clm
from pytest_causal_lm.checks._generation import GreedyRun, compare_continuations


def test_healthy_checkpoints_pass_every_generation_invariant(healthy: clm.CausalLM) -> None:
    model, tokenizer = healthy.model, healthy.tokenizer
    source, kwargs = healthy.pretrained_location()
    score_comparisons = [
        clm.assert_kv_cache_parity(model, tokenizer),
        clm.assert_greedy_parity(model, tokenizer),
        clm.assert_classification_head_equivalent(model, tokenizer, source=source, **kwargs),
        clm.assert_padding_invariant(model, tokenizer),
        clm.assert_batch_independent(model, tokenizer),
    ]
    for result in score_comparisons:
        # float32 on CPU: different code paths agree far inside the tolerance the result reports
        assert result.tolerance is not None, str(result)
        assert result.greatest_difference < 0.5 * result.tolerance.atol, str(result)
        assert result.as_dict()["figure"] == ["Δ", result.greatest_difference]
    assert clm.assert_cache_effective(model, tokenizer).figure == ("tokens/step", 1)
    assert clm.assert_chat_template_consistent(model, tokenizer).invariant == "chat template"


# --- KV-cache parity -------------------------------------------------------------------------


def test_kv_cache_parity_catches_a_cache_that_drops_the_newest_key_of_one_layer(tiny_path) -> None:
    model, tokenizer = broken.cache_drops_newest_key(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_kv_cache_parity(model, tokenizer)
    message = str(caught.value)
    assert re.match(r"KV-cache parity violated: decoding step 1 \(position \d+, token .+ \(id \d+\)\) differs", message)
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at position 0", message)
    assert "tolerance" in message and "atol=0.0001" in message


def test_kv_cache_parity_catches_positions_that_restart_at_zero_with_the_cache(tiny_path) -> None:
    model, tokenizer = broken.positions_restart_with_cache(tiny_path)
    with pytest.raises(AssertionError, match=r"KV-cache parity violated: decoding step 1 \(position \d+"):
        clm.assert_kv_cache_parity(model, tokenizer)


def test_kv_cache_parity_checks_chunked_prefill(qwen3_path) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    original = model.forward

    def forward(input_ids=None, position_ids=None, **kwargs):
        # one-token steps are healthy; a multi-token chunk after the first restarts its positions at 0
        cache = broken.cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0 and input_ids.shape[1] > 1:
            position_ids = torch.arange(input_ids.shape[1])[None]
        return original(input_ids=input_ids, position_ids=position_ids, **kwargs)

    model.forward = forward
    with pytest.raises(AssertionError, match=r"chunk 2 of 2 \(positions \d+\.\.\d+\) differs from the full forward"):
        clm.assert_kv_cache_parity(model, tokenizer)


def test_kv_cache_parity_checks_a_left_padded_batch(llama_path) -> None:
    model, tokenizer = broken.decode_ignores_padding(llama_path)
    with pytest.raises(AssertionError, match=r"left-padded batch, row \d \(\d+ pad tokens\), decoding step 1"):
        clm.assert_kv_cache_parity(model, tokenizer)


# --- cache effectiveness ---------------------------------------------------------------------


def test_cache_effectiveness_catches_a_cache_that_is_ignored(tiny_path) -> None:
    model, tokenizer = broken.cache_ignored_in_generate(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_cache_effective(model, tokenizer, max_new_tokens=4)
    message = str(caught.value)
    assert "cache not effective: decoding steps re-feed the sequence" in message
    assert re.search(r"first bad step\s+: step 1 fed input of shape \(2, \d+\), expected \(2, 1\)", message)
    assert "past_key_values ignored" in message


def test_cache_effectiveness_counts_one_token_per_step_on_a_healthy_model(healthy: clm.CausalLM) -> None:
    result = clm.assert_cache_effective(healthy.model, healthy.tokenizer, max_new_tokens=5)
    assert "4 decoding steps fed [1] tokens/sequence" in str(result)


# --- greedy-loop parity ----------------------------------------------------------------------


def test_greedy_parity_catches_a_generate_that_feeds_the_previous_token(tiny_path) -> None:
    model, tokenizer = broken.generate_feeds_previous_token(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_greedy_parity(model, tokenizer)
    message = str(caught.value)
    assert re.match(r"greedy-loop parity violated \(plain '.*'\) at step \d+ with a clear score margin", message)
    assert re.search(r"loop without cache\s+: '", message) and re.search(r"model.generate\s+: '", message)
    assert re.search(
        r"scores at divergence\s+: .+ scores [-0-9.e]+, .+ scores [-0-9.e]+: margin [0-9.e-]+ vs tolerance", message
    )


def _run(scores: list[list[float]]) -> GreedyRun:
    return GreedyRun(
        tokens=[int(torch.tensor(s).argmax()) for s in scores], step_scores=[torch.tensor(s) for s in scores]
    )


def test_a_divergence_at_a_near_tie_passes_with_a_warning_naming_both_tokens(healthy: clm.CausalLM) -> None:
    reference = _run([[0.0, 5.0, 1.0], [2.0, 0.0, 2.0 - 1e-6]])
    prompt = torch.tensor([[1, 2]])
    with pytest.warns(
        clm.NearTieWarning, match=r"near-tie \(accepted\): step 1 .* chose .*\(id 0\), .* chose .*\(id 2\)"
    ):
        compare_continuations(
            healthy.model,
            healthy.tokenizer,
            prompt,
            reference,
            [1, 2],
            reference_label="loop",
            other_label="generate",
            tolerance=clm.Tolerance(1e-4, 1e-4),
        )


def test_a_divergence_with_a_clear_margin_fails(healthy: clm.CausalLM) -> None:
    reference = _run([[0.0, 5.0, 1.0], [2.0, 0.0, 1.0]])
    with pytest.raises(AssertionError, match=r"at step 1 with a clear score margin(.|\n)*margin 1 vs tolerance"):
        compare_continuations(
            healthy.model,
            healthy.tokenizer,
            torch.tensor([[1, 2]]),
            reference,
            [1, 2],
            reference_label="loop",
            other_label="generate",
            tolerance=clm.Tolerance(1e-4, 1e-4),
        )


def test_greedy_parity_reports_generation_config_settings_that_change_greedy_output(tiny_path) -> None:
    model, tokenizer = broken.load_healthy(tiny_path)
    model.generation_config.repetition_penalty = 5.0
    with pytest.warns(
        clm.GenerationConfigWarning, match=r"sets repetition_penalty=5.0; it changes greedy output: .* from step \d+"
    ):
        result = clm.assert_greedy_parity(model, tokenizer)
    assert any("repetition_penalty" in note for note in result.notes)


def test_greedy_parity_says_when_the_checkpoint_samples_by_default(qwen3_path) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    with pytest.warns(clm.GenerationConfigWarning, match=r"do_sample=True: model.generate\(\) samples by default"):
        clm.assert_greedy_parity(model, tokenizer)


# --- classification head ---------------------------------------------------------------------


def test_classification_head_catches_a_causal_head_with_a_bias(llama_path) -> None:
    model, tokenizer = broken.lm_head_with_bias(llama_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_classification_head_equivalent(model, tokenizer, source=str(llama_path))
    message = str(caught.value)
    assert "classification head is not equivalent to the causal LM: scores for 'Hi dog how are you?'" in message
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at row 0, score of .+ \(id \d+\)", message)


def test_classification_head_names_final_logit_softcapping_instead_of_a_bare_mismatch(qwen3_path) -> None:
    model, tokenizer = broken.soft_capped_head(qwen3_path)
    with pytest.raises(
        pytest.skip.Exception, match=r"applies final logit soft-capping \(final_logit_softcapping=0.5\)"
    ):
        clm.assert_classification_head_equivalent(model, tokenizer, source=str(qwen3_path))


def test_classification_head_with_tied_embeddings_takes_the_stored_embeddings_instead_of_a_random_head(
    qwen3_path,
) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    classifier, notes = clm.load_score_head_classifier(model, str(qwen3_path))
    assert notes == ["lm_head.weight is not stored (tied embeddings): score.weight is the stored embeddings"]
    assert torch.equal(classifier.score.weight, model.get_output_embeddings().weight)
    result = clm.assert_classification_head_equivalent(model, tokenizer, classifier)
    assert result.greatest_difference < 1e-4


def test_classification_head_skips_architectures_without_a_classifier_class(qwen3_path) -> None:
    model, tokenizer = broken.load_healthy(qwen3_path)
    model.config.model_type = "my_new_arch"
    with pytest.raises(pytest.skip.Exception, match="my_new_arch has no sequence-classification class"):
        clm.assert_classification_head_equivalent(model, tokenizer, source=str(qwen3_path))


# --- padding and batch invariance ------------------------------------------------------------


def test_padding_invariance_catches_a_kernel_that_ignores_the_padding_mask(tiny_path) -> None:
    model, tokenizer = broken.padding_mask_ignored(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_padding_invariant(model, tokenizer)
    message = str(caught.value)
    assert re.match(r"padding changes scores: row \d of a left-padded batch \(\d+ pad tokens, id \d+\)", message)
    assert re.search(r"greatest \|difference\|\s+: [0-9.e-]+ at row 0", message)


def test_padding_invariance_still_fails_when_forward_hides_its_arguments_behind_kwargs(qwen3_path) -> None:
    # custom code often has forward(**kwargs): the skip for models without position_ids must not hide this bug
    model, tokenizer = broken.padding_mask_ignored(qwen3_path)
    original = model.forward
    model.forward = lambda **kwargs: original(**kwargs)
    with pytest.raises(AssertionError, match=r"padding changes scores: row \d of a left-padded batch"):
        clm.assert_padding_invariant(model, tokenizer)


def test_batch_independence_catches_rows_coupled_through_batch_statistics(tiny_path) -> None:
    model, tokenizer = broken.rows_coupled(tiny_path)
    with pytest.raises(AssertionError) as caught:
        clm.assert_batch_independent(model, tokenizer)
    message = str(caught.value)
    assert message.startswith(
        "rows are coupled: row 0's scores at position 0 change with the other rows of a batch of 2"
    )
    assert re.search(r"token there\s+: .+ \(id \d+\)", message)


# --- chat template ---------------------------------------------------------------------------


def test_chat_template_catches_a_template_that_double_adds_bos(llama_path) -> None:
    model, tokenizer = broken.with_chat_template(llama_path, lambda template: "{{ bos_token }}" + template)
    with pytest.raises(
        AssertionError, match=r"doubled BOS\s+: apply_chat_template ids start with '<\|begin_of_text\|>' twice"
    ):
        clm.assert_chat_template_consistent(model, tokenizer)


def test_generation_prompt_catches_an_opener_that_is_not_how_an_answered_turn_begins(qwen3_path) -> None:
    model, tokenizer = broken.with_chat_template(
        qwen3_path, lambda template: template.replace("'<|im_start|>assistant\\n' }}", "'<|im_start|>assistent\\n' }}")
    )
    with pytest.raises(
        AssertionError, match=r"the generation prompt is not how the template opens an assistant turn"
    ) as caught:
        clm.assert_generation_prompt_opens_the_answer(model, tokenizer)
    assert "the prompt has 'tart|>assistent\\n', the answered one 'tart|>assistant\\nFine, thanks." in str(caught.value)


def test_chat_template_catches_a_template_kwarg_that_is_ignored(qwen3_path) -> None:
    model, tokenizer = broken.with_chat_template(
        qwen3_path,
        lambda template: (
            template.replace("enable_thinking is defined and enable_thinking is false", "false")
            + "{# enable_thinking is accepted but ignored #}"
        ),
    )
    with pytest.raises(
        AssertionError, match=r"enable_thinking\s+: passing enable_thinking=False does not change the rendered prompt"
    ):
        clm.assert_chat_template_consistent(model, tokenizer)


def test_chat_template_notes_when_tokenizing_the_text_would_double_bos(llama_path, recwarn) -> None:
    model, tokenizer = broken.load_healthy(llama_path)
    result = clm.assert_chat_template_consistent(model, tokenizer)
    assert any("the template writes BOS and the tokenizer adds another" in note for note in result.notes)
    assert not recwarn.list  # a hazard real Llama 3 shares, not a defect: no warning on a healthy checkpoint


def test_chat_template_skips_without_a_template(qwen3_path) -> None:
    model, tokenizer = broken.with_chat_template(qwen3_path, lambda template: None)
    with pytest.raises(pytest.skip.Exception, match="the tokenizer has no chat template"):
        clm.assert_chat_template_consistent(model, tokenizer)


def test_near_tie_warning_is_not_an_error_by_default() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not issubclass(clm.NearTieWarning, (DeprecationWarning, RuntimeError))


def test_generation_by_classification_pools_the_last_token_when_the_model_generates_its_pad_token(
    llama_path,
) -> None:
    # Regression: the classifier pools the last non-pad token, so a generated pad token used to be skipped.
    model, tokenizer = broken.load_healthy(llama_path)
    prompts = ("Hi dog how are you?", "The quick brown fox")
    prompt_ids = {int(i) for text in prompts for i in tokenizer(text)["input_ids"]}
    first = clm.greedy_loop(
        model, tokenizer(prompts[0], return_tensors="pt")["input_ids"], max_new_tokens=6, stop_ids=set()
    )
    generated_pad = next(t for t in first.tokens[1:] if t not in prompt_ids)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(generated_pad)
    model.config.pad_token_id = generated_pad
    result = clm.assert_classification_head_equivalent(model, tokenizer, source=str(llama_path), prompts=prompts)
    assert result.greatest_difference < 1e-4


# --- architectures whose design rules an invariant out, and real transformers discrepancies --


@pytest.fixture(scope="module")
def load_tiny():
    from pytest_causal_lm.loading import load
    from pytest_causal_lm.targets import Target

    return lambda name: load(Target(f"tiny:{name}", "cpu", "float32"), seed=0)


def test_padding_fails_with_the_cause_when_the_forward_does_not_use_position_ids(load_tiny) -> None:
    # BartForCausalLM: learned absolute positions, no position_ids argument; left-padded generation gives wrong text
    bart = load_tiny("bart")
    with pytest.raises(AssertionError, match=r"padding changes") as caught:
        clm.assert_padding_invariant(bart.model, bart.tokenizer)
    assert re.search(
        r"likely cause\s+: BartForCausalLM.forward does not use position_ids: left padding", str(caught.value)
    )


def test_padding_fails_with_the_cause_when_a_recurrent_model_ignores_the_attention_mask(load_tiny) -> None:
    rwkv = load_tiny("rwkv")
    with pytest.raises(AssertionError, match=r"padding changes") as caught:
        clm.assert_padding_invariant(rwkv.model, rwkv.tokenizer)
    assert "RwkvForCausalLM.forward uses neither attention_mask nor position_ids" in str(caught.value)


def test_a_known_limitation_can_be_acknowledged_and_a_fix_shows(pytester: pytest.Pytester) -> None:
    args = ("--causal-lm-checkpoint=tiny:bart", "-m", "causal_lm_padding", "-k", "padding_invariance")
    failing = pytester.runpytest(*args)
    failing.assert_outcomes(failed=1)
    acknowledged = pytester.runpytest(*args, "--causal-lm-known-limitations=padding_invariance", "-rx")
    acknowledged.assert_outcomes(xfailed=1)
    acknowledged.stdout.fnmatch_lines(["tiny-bart-cpu-float32 * lim *", "*known limitation this project acknowledges*"])
    fixed = pytester.runpytest(
        "--causal-lm-checkpoint=tiny:qwen3",
        "-m",
        "causal_lm_padding",
        "-k",
        "padding_invariance",
        "--causal-lm-known-limitations=padding_invariance",
    )
    fixed.assert_outcomes(failed=1)  # strict: a limitation that no longer fails must be taken off the list
    typo = pytester.runpytest("--causal-lm-known-limitations=padding")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR


def test_greedy_parity_names_default_positions_that_differ_from_generate(load_tiny) -> None:
    # transformers 5's generate passes position_ids from 0; RoBERTa's forward counts from padding_idx + 1
    roberta = load_tiny("roberta")
    with pytest.raises(AssertionError) as caught:
        clm.assert_greedy_parity(roberta.model, roberta.tokenizer)
    message = str(caught.value)
    assert "greedy-loop parity violated" in message
    assert re.search(
        r"likely cause\s+: the forward's default positions are not the ones generate passes \(counted from 0\): "
        r"last-token scores differ by [0-9.e-]+",
        message,
    )
