"""Tokenizer and chat-template invariants: real conventions pass, realistic conversion bugs fail."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conventions import CONVENTIONS, convention, drop_added_token, edit_tokenizer_json

import pytest_causal_lm as clm

TOKENIZER_CHECKS = (
    clm.assert_tokenizer_round_trip,
    clm.assert_prompt_special_tokens,
    clm.assert_chat_markers_are_tokens,
    clm.assert_generation_prompt_opens_the_answer,
    clm.assert_turn_terminator_stops_generation,
    clm.assert_chat_template_consistent,
    clm.assert_chat_turns_rendered,
    clm.assert_decoded_answer_has_no_markers,
    clm.assert_streamed_decode_matches,
)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_real_chat_conventions_pass_every_tokenizer_check(name: str, qwen3_path: Path, tmp_path: Path) -> None:
    model, tokenizer = convention(qwen3_path, name, tmp_path)
    for check in TOKENIZER_CHECKS:
        check(model, tokenizer)


def test_qwen3_convention_renders_its_reasoning_block(qwen3_path: Path, tmp_path: Path) -> None:
    _, tokenizer = convention(qwen3_path, "qwen3", tmp_path)
    answered = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]
    assert tokenizer.apply_chat_template(answered, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nYes.<|im_end|>\n"
    )


def test_healthy_tiny_checkpoints_pass_every_tokenizer_check(healthy: clm.CausalLM) -> None:
    for check in TOKENIZER_CHECKS:
        check(healthy.model, healthy.tokenizer)


# --- round trip -------------------------------------------------------------------------------------------------


def test_round_trip_catches_a_prefix_space_added_in_conversion(qwen3_path: Path, tmp_path: Path) -> None:
    convention(qwen3_path, "qwen3", tmp_path)
    model, tokenizer = edit_tokenizer_json(tmp_path, lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True))
    with pytest.raises(AssertionError, match=r"tokenizer round trip changes the text at character 0") as failure:
        clm.assert_tokenizer_round_trip(model, tokenizer)
    message = str(failure.value)
    assert "expected     : 'Hi dog how are '" in message and "decoded      : ' Hi dog how are'" in message
    assert "tokens there : 'ĠH' (id " in message


def test_round_trip_catches_a_lost_byte_decoder(qwen3_path: Path, tmp_path: Path) -> None:
    convention(qwen3_path, "qwen3", tmp_path)
    model, tokenizer = edit_tokenizer_json(tmp_path, lambda spec: spec.update(decoder=None))
    with pytest.raises(AssertionError, match=r"round trip changes the text at character 3") as failure:
        clm.assert_tokenizer_round_trip(model, tokenizer)
    assert "decoded      : 'Hi Ġdog Ġhow Ġare '" in str(failure.value)


def test_round_trip_allows_the_normalization_a_tokenizer_declares(qwen3_path: Path, tmp_path: Path) -> None:
    convention(qwen3_path, "qwen3", tmp_path)
    model, tokenizer = edit_tokenizer_json(tmp_path, lambda spec: spec.update(normalizer={"type": "Lowercase"}))
    clm.assert_tokenizer_round_trip(model, tokenizer)  # an uncased vocabulary is lossy on purpose


# --- what a plain encode adds -----------------------------------------------------------------------------------


def test_prompt_special_tokens_catches_an_eos_appended_to_every_prompt(qwen3_path: Path, tmp_path: Path) -> None:
    convention(qwen3_path, "qwen3", tmp_path)
    eos_id = json.loads((tmp_path / "config.json").read_text())["eos_token_id"]
    processor = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [eos_id], "tokens": ["<|im_end|>"]}},
    }
    model, tokenizer = edit_tokenizer_json(tmp_path, lambda spec: spec.update(post_processor=processor))
    with pytest.raises(AssertionError, match=r"a plain encode appends tokens after the prompt") as failure:
        clm.assert_prompt_special_tokens(model, tokenizer)
    assert f"appended     : '<|im_end|>' (id {eos_id})" in str(failure.value)
    clm.assert_tokenizer_round_trip(model, tokenizer)  # decoding skips it: only this check sees it


def test_prompt_special_tokens_catches_a_template_that_drops_the_bos_the_tokenizer_adds(
    qwen3_path: Path, tmp_path: Path
) -> None:
    template = CONVENTIONS["llama3"]["template"].replace("bos_token + content", "content")
    model, tokenizer = convention(qwen3_path, "llama3", tmp_path, template=template)
    with pytest.raises(
        AssertionError,
        match=r"BOS disagrees between plain prompts and chat prompts: a plain encode adds BOS, but the chat "
        r"template does not write it",
    ):
        clm.assert_prompt_special_tokens(model, tokenizer)


# --- markers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "marker"), [("qwen3", "<|im_start|>"), ("llama3", "<|start_header_id|>"), ("gemma", "<start_of_turn>")]
)
def test_markers_catch_a_conversion_that_loses_an_added_token(
    qwen3_path: Path, tmp_path: Path, name: str, marker: str
) -> None:
    convention(qwen3_path, name, tmp_path)
    model, tokenizer = drop_added_token(tmp_path, marker)
    with pytest.raises(
        AssertionError, match=rf"chat markers are not single tokens: '{__import__('re').escape(marker)}'"
    ) as failure:
        clm.assert_chat_markers_are_tokens(model, tokenizer)
    assert f"{marker} " in str(failure.value) and "encodes to " in str(failure.value)


def test_markers_catch_a_think_tag_that_is_no_longer_one_token(qwen3_path: Path, tmp_path: Path) -> None:
    convention(qwen3_path, "qwen3", tmp_path)
    model, tokenizer = drop_added_token(tmp_path, "<think>")
    with pytest.raises(AssertionError, match=r"chat markers are not single tokens: '<think>'"):
        clm.assert_chat_markers_are_tokens(model, tokenizer)


# --- the generation prompt ----------------------------------------------------------------------------------------


def test_generation_prompt_catches_a_template_that_never_opens_the_assistant_turn(
    qwen3_path: Path, tmp_path: Path
) -> None:
    # a port that dropped the add_generation_prompt branch: the prompt ends after the user's turn
    template = CONVENTIONS["llama3"]["template"].split("{% if add_generation_prompt %}")[0]
    model, tokenizer = convention(qwen3_path, "llama3", tmp_path, template=template)
    with pytest.raises(AssertionError, match=r"the generation prompt is not how the template opens") as failure:
        clm.assert_generation_prompt_opens_the_answer(model, tokenizer)
    assert "an answered turn writes '<|start_header_id|>assistant<|end_header_id|>\\n\\n' before the answer" in str(
        failure.value
    )


def test_generation_prompt_passes_a_template_without_an_assistant_opener(qwen3_path: Path, tmp_path: Path) -> None:
    mistral_style = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    model, tokenizer = convention(qwen3_path, "llama3", tmp_path, template=mistral_style)
    clm.assert_generation_prompt_opens_the_answer(model, tokenizer)


# --- every turn rendered ------------------------------------------------------------------------------------------


def test_chat_turns_catch_a_template_that_assumes_a_system_message_comes_first(
    qwen3_path: Path, tmp_path: Path
) -> None:
    # a template edited to skip the system message it renders above, without checking that there is one
    template = CONVENTIONS["qwen3"]["template"].replace("for message in messages", "for message in messages[1:]")
    model, tokenizer = convention(qwen3_path, "qwen3", tmp_path, template=template)
    with pytest.raises(AssertionError) as failure:
        clm.assert_chat_turns_rendered(model, tokenizer)
    message = str(failure.value)
    assert message.startswith("chat template: message 1 of 1 (user) is missing in the rendering of one user message")
    assert "'User question number 1: what colour are apples?'" in message


def test_chat_turns_catch_a_template_that_renders_the_system_message_twice(qwen3_path: Path, tmp_path: Path) -> None:
    # a port of the Llama 3 template that renders the system message as a header and again inside the loop
    template = CONVENTIONS["llama3"]["template"].replace(
        "{% for message in messages %}",
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}{% for message in messages %}",
    )
    model, tokenizer = convention(qwen3_path, "llama3", tmp_path, template=template)
    with pytest.raises(AssertionError, match=r"message 1 of 2 \(system\) appears 2 times in the rendering of system"):
        clm.assert_chat_turns_rendered(model, tokenizer)


def test_chat_turns_note_a_template_that_rejects_the_system_role(qwen3_path: Path, tmp_path: Path) -> None:
    model, tokenizer = convention(qwen3_path, "gemma", tmp_path)
    notes = clm.assert_chat_turns_rendered(model, tokenizer).notes
    assert "template rejects system and user (TemplateError: a system role)" in notes
    assert "three user turns: 5 messages rendered once each, in order" in notes


def test_a_template_that_breaks_on_a_system_message_fails_instead_of_counting_as_a_rejection(
    qwen3_path: Path, tmp_path: Path
) -> None:
    # a hand edit with a typo in the system branch: jinja raises UndefinedError, not the template's own refusal
    template = CONVENTIONS["qwen3"]["template"].replace(
        "messages[0].content + '<|im_end|>", "messages[0].contnet.strip() + '<|im_end|>"
    )
    model, tokenizer = convention(qwen3_path, "qwen3", tmp_path, template=template)
    with pytest.raises(AssertionError, match=r"chat template raises on a conversation of system and user") as caught:
        clm.assert_chat_turns_rendered(model, tokenizer)
    assert "UndefinedError" in str(caught.value)


# --- what users read ------------------------------------------------------------------------------------------


def _not_special(spec: dict, contents: tuple[str, ...]) -> None:
    for token in spec["added_tokens"]:
        if token["content"] in contents:
            token["special"] = False


def test_decoded_answer_catches_markers_a_conversion_registered_as_ordinary_added_tokens(
    qwen3_path: Path, tmp_path: Path
) -> None:
    convention(qwen3_path, "llama3", tmp_path)
    headers = ("<|start_header_id|>", "<|end_header_id|>")
    model, tokenizer = edit_tokenizer_json(tmp_path, lambda spec: _not_special(spec, headers))
    clm.assert_chat_markers_are_tokens(model, tokenizer)  # still one registered token each: only decode shows it
    with pytest.raises(AssertionError) as failure:
        clm.assert_decoded_answer_has_no_markers(model, tokenizer)
    message = str(failure.value)
    assert message.startswith(
        "decode(skip_special_tokens=True) of the whole conversation shows template markers "
        "['<|start_header_id|>', '<|end_header_id|>']"
    )
    assert "id 380, an added token with special=False (decode keeps tokens that are not special)" in message


def test_streamed_decode_catches_a_decoder_that_strips_the_start_of_every_decode(
    qwen3_path: Path, tmp_path: Path
) -> None:
    # a conversion that gave a byte-level tokenizer SentencePiece's decoder tail (Strip one leading space)
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.24"):
        pytest.skip(
            f"transformers {transformers.__version__}'s TextStreamer keeps the last token as decoding context after "
            "a newline, so this decoder streams correctly there: the bug reaches users of 5.0-5.23 only"
        )
    convention(qwen3_path, "qwen3", tmp_path)
    strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    model, tokenizer = edit_tokenizer_json(
        tmp_path, lambda spec: spec.update(decoder={"type": "Sequence", "decoders": [spec["decoder"], strip]})
    )
    with pytest.raises(AssertionError) as failure:
        clm.assert_streamed_decode_matches(model, tokenizer)
    message = str(failure.value)
    assert re.match(r"streamed text differs from decode\(\) of the same ids from character \d+", message)
    assert "'    if name:" in message and "'   if name:" in message
    assert "TextStreamer restarts decoding after each newline" in message


# --- the turn terminator ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stop", "terminator"),
    [
        ("qwen3", ["<|endoftext|>"], "<|im_end|>"),  # the base model's eos only
        ("llama3", ["<|end_of_text|>"], "<|eot_id|>"),  # Llama 3 Instruct's first generation_config
        ("gemma", ["<eos>"], "<end_of_turn>"),
    ],
)
def test_turn_terminator_catches_a_generation_config_that_does_not_stop_at_it(
    qwen3_path: Path, tmp_path: Path, name: str, stop: list[str], terminator: str
) -> None:
    model, tokenizer = convention(qwen3_path, name, tmp_path, stop=stop)
    pattern = rf"generate does not stop at '{__import__('re').escape(terminator)}' \(id \d+\), the token that ends"
    with pytest.raises(AssertionError, match=pattern) as failure:
        clm.assert_turn_terminator_stops_generation(model, tokenizer)
    assert f"generated after forcing it     : ['{terminator}', '{terminator}', '{terminator}']" in str(failure.value)


def test_turn_terminator_skips_a_template_that_writes_no_terminator(qwen3_path: Path, tmp_path: Path) -> None:
    plain = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    model, tokenizer = convention(
        qwen3_path, "qwen3", tmp_path, template=plain + "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(pytest.skip.Exception, match="the template marks no turn with a special token"):
        clm.assert_turn_terminator_stops_generation(model, tokenizer)


def test_turn_terminator_fails_a_chat_template_whose_turns_never_close(qwen3_path: Path, tmp_path: Path) -> None:
    # a template edited to drop <|im_end|> after each message: turns open with <|im_start|>, nothing ends one
    template = CONVENTIONS["qwen3"]["template"].replace("'<|im_end|>\\n'", "'\\n'")
    assert "<|im_end|>" not in template
    model, tokenizer = convention(qwen3_path, "qwen3", tmp_path, template=template)
    with pytest.raises(AssertionError) as caught:
        clm.assert_turn_terminator_stops_generation(model, tokenizer)
    message = str(caught.value)
    assert message.startswith("the chat template closes an assistant turn with no special token")
    assert re.search(r"turns open with +: \['<\|im_start\|>'", message), message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tokenizer_and_chat_broken_models_fail_in_every_dtype(qwen3_path: Path, tmp_path: Path, dtype) -> None:
    # the terminator check generates, so its verdict could depend on the dtype; the others read the tokenizer
    model, tokenizer = convention(qwen3_path, "llama3", tmp_path / "stop", stop=["<|end_of_text|>"])
    with pytest.raises(AssertionError, match=r"generate does not stop at '<\|eot_id\|>'"):
        clm.assert_turn_terminator_stops_generation(model.to(dtype), tokenizer)
    convention(qwen3_path, "qwen3", tmp_path / "lost")
    model, tokenizer = drop_added_token(tmp_path / "lost", "<|im_start|>")
    with pytest.raises(AssertionError, match=r"chat markers are not single tokens"):
        clm.assert_chat_markers_are_tokens(model.to(dtype), tokenizer)
    template = CONVENTIONS["qwen3"]["template"].replace("for message in messages", "for message in messages[1:]")
    model, tokenizer = convention(qwen3_path, "qwen3", tmp_path / "turns", template=template)
    with pytest.raises(AssertionError, match=r"message 1 of 1 \(user\) is missing"):
        clm.assert_chat_turns_rendered(model.to(dtype), tokenizer)
    convention(qwen3_path, "llama3", tmp_path / "shown")
    headers = ("<|start_header_id|>", "<|end_header_id|>")
    model, tokenizer = edit_tokenizer_json(tmp_path / "shown", lambda spec: _not_special(spec, headers))
    with pytest.raises(AssertionError, match=r"shows template markers"):
        clm.assert_decoded_answer_has_no_markers(model.to(dtype), tokenizer)
