"""Real chat conventions (Qwen3, Llama 3, Gemma) rebuilt offline on the tiny tokenizer, and the ways they break.

Each convention keeps its family's markers as registered special tokens, its BOS
policy, its template's behaviour (Qwen3's reasoning block and enable_thinking,
Llama 3's headers and <|eot_id|>, Gemma's <start_of_turn>/model turns and
rejected system role) and the eos ids its generation_config stops at. They are
saved with save_pretrained and loaded back through AutoTokenizer, as a real
checkpoint would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

QWEN3_TEMPLATE = """
{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'user' %}
    {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {%- set content = message.content %}
    {%- set reasoning_content = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {%- if loop.last or reasoning_content %}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
    {%- else %}
      {{- '<|im_start|>assistant\\n' + content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
""".strip()

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# name -> (special tokens to register, bos, eos, template, the eos ids generation stops at)
CONVENTIONS: dict[str, dict[str, Any]] = {
    "qwen3": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "template": QWEN3_TEMPLATE,
        "stop": ["<|im_end|>", "<|endoftext|>"],
    },
    "llama3": {
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "template": LLAMA3_TEMPLATE,
        "stop": ["<|end_of_text|>", "<|eot_id|>"],
    },
    "gemma": {
        "special": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "template": GEMMA_TEMPLATE,
        "stop": ["<eos>", "<end_of_turn>"],
    },
}


def convention(base: Path, name: str, target: Path, **changes: Any) -> tuple[Any, Any]:
    """The tiny qwen3 model with ``name``'s tokenizer conventions, saved to ``target`` and loaded back.

    ``changes`` override the convention (``template``, ``stop``, ``bos``) the way a
    port or a config edit would.
    """
    spec = {**CONVENTIONS[name], **changes}
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": spec["special"]})
    tokenizer.bos_token, tokenizer.eos_token = spec["bos"], spec["eos"]
    if spec["bos"]:  # BOS added by the tokenizer, as Llama 3 and Gemma do
        bos_id = tokenizer.convert_tokens_to_ids(spec["bos"])
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A",
            pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)],
        )
    tokenizer.chat_template = spec["template"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(spec["stop"])
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return load(target)


def load(path: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def edit_tokenizer_json(path: Path, edit: Any) -> tuple[Any, Any]:
    """Apply ``edit(tokenizer.json as a dict)`` to a saved checkpoint, as a conversion script would, and reload."""
    file = path / "tokenizer.json"
    spec = json.loads(file.read_text())
    edit(spec)
    file.write_text(json.dumps(spec))
    return load(path)


def drop_added_token(path: Path, content: str) -> tuple[Any, Any]:
    """A conversion that loses one added token: ``content`` is then split into ordinary pieces."""
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    decoder = config.get("added_tokens_decoder", {})  # transformers 5 keeps them in tokenizer.json only
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v["content"] != content}
    config["extra_special_tokens"] = [t for t in config.get("extra_special_tokens", []) if t != content]
    config_file.write_text(json.dumps(config))
    return edit_tokenizer_json(
        path, lambda spec: spec.update(added_tokens=[t for t in spec["added_tokens"] if t["content"] != content])
    )
