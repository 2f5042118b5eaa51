"""The built-in suite's probes as one plain script: load once, run every probe, no pytest, no plugin.

The reference the suite's own cost is measured against (benchmarks/test_suite_cost.py):
the same inputs, forwards and generate calls the invariants make, written the way
a careful engineer would write them by hand, sharing what is naturally shared.

    python benchmarks/plain_probes.py CHECKPOINT [LONG_PREFILL_TOKENS]
"""

from __future__ import annotations

import itertools
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

TEXTS = (
    "Hi dog how are you?",
    "Text generation is sequence classification in a for-loop.",
    "The quick brown fox jumps over the lazy dog.",
)
CORPUS = (
    "Hi dog how are you?",
    "def greet(name):\n    if name:\n        return name\n",
    "café 東京 👋",
    "  two  spaces\n",
)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def left_padded(tokenizer, texts, pad):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def generate(model, ids, mask, n, pad, eos):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad, eos_token_id=eos
        )
    return out[:, ids.shape[1] :]


def cached_loop(model, ids, n):
    tokens, cache, step_ids = [], None, ids
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=step_ids, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step_ids = torch.tensor([[tokens[-1]]])
    return tokens


def probes(model, tokenizer, checkpoint):
    encode = [tokenizer(t, return_tensors="pt")["input_ids"] for t in TEXTS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    high = min(len(tokenizer), model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    # shapes, vocab, logits_to_keep, determinism (first pass shared)
    with torch.no_grad():
        first = [model(input_ids=ids, output_hidden_states=True, use_cache=True).logits.float() for ids in encode]
    ids, mask, positions = left_padded(tokenizer, TEXTS, pad)
    logits(model, ids, attention_mask=mask)
    assert torch.allclose(logits(model, encode[1], logits_to_keep=1)[0, -1], first[1][0, -1], atol=1e-4)
    for ids_, before in zip(encode, first, strict=True):
        assert torch.allclose(logits(model, ids_), before, atol=1e-4)
    # prefix causality: natural text and random ids, 7 changes each
    for base in (encode[0], torch.randint(0, high, (1, 16), generator=g)):
        full, n = logits(model, base)[0], base.shape[1]
        variants = [(base[:, : n // 2], n // 2)]
        variants += [(torch.cat([base, torch.randint(0, high, (1, k), generator=g)], 1), n) for k in (1, 4)]
        for position in (1, n // 2, n - 1):
            changed = base.clone()
            changed[0, position] = (changed[0, position] + 1) % high
            variants.append((changed, position))
        tail = base.clone()
        tail[0, n // 2 :] = torch.randint(0, high, (n - n // 2,), generator=g)
        variants.append((tail, n // 2))
        for variant, kept in variants:
            assert torch.allclose(logits(model, variant)[0, :kept], full[:kept], atol=1e-4)
    # KV-cache parity: step by step, 2 and 3 chunks, left-padded batch extended by 4 tokens
    text, full = encode[1], first[1][0]
    n = text.shape[1]
    with torch.no_grad():
        cache = model(input_ids=text[:, : n // 3], use_cache=True).past_key_values
        for p in range(n // 3, n):
            out = model(input_ids=text[:, p : p + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            assert torch.allclose(out.logits[0, 0].float(), full[p], atol=1e-4)
        for chunks in (2, 3):
            bounds, cache = torch.linspace(0, n, chunks + 1).round().long().tolist(), None
            for a, b in itertools.pairwise(bounds):
                out = model(input_ids=text[:, a:b], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                assert torch.allclose(out.logits[0].float(), full[a:b], atol=1e-4)
        extra = torch.randint(0, high, (3, 4), generator=g)
        all_ids, all_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
        all_pos = (all_mask.cumsum(-1) - 1).clamp(min=0)
        batch_full = logits(model, all_ids, attention_mask=all_mask, position_ids=all_pos)
        cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
        for at in range(ids.shape[1], all_ids.shape[1]):
            out = model(
                input_ids=all_ids[:, at : at + 1],
                attention_mask=all_mask[:, : at + 1],
                position_ids=all_pos[:, at : at + 1],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            assert torch.allclose(out.logits[:, 0].float(), batch_full[:, at], atol=1e-4)
    # cache effectiveness: a batch generate of 6 tokens with a forward hook counting tokens per step
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].shape), with_kwargs=True)
    generate(model, ids[:2], mask[:2], 6, pad, eos)
    hook.remove()
    assert all(shape[1] == 1 for shape in fed[1:])
    # greedy-loop parity: generate, the cached loop and the uncached loop (one pass along generate's tokens)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How are you?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    for prompt in (encode[0], encode[1], chat):
        generated = generate(model, prompt, torch.ones_like(prompt), 12, pad, eos)[0].tolist()
        assert cached_loop(model, prompt, len(generated)) == generated
        along = logits(model, torch.cat([prompt, torch.tensor([generated])], 1))[0, prompt.shape[1] - 1 : -1]
        assert along.argmax(-1).tolist() == generated
    # classification head: the tutorial's classifier, alone, left- and right-padded, and generating 8 tokens
    classifier = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=model.config.vocab_size, key_mapping={r"^lm_head\.weight$": "score.weight"}
    ).eval()
    with torch.no_grad():
        classifier.score.weight.copy_(model.get_output_embeddings().weight)
        classifier.config.pad_token_id = pad
        for ids_, before in zip(encode, first, strict=True):
            assert torch.allclose(classifier(input_ids=ids_).logits[0], before[0, -1], atol=1e-4)
        classifier(input_ids=ids, attention_mask=mask, position_ids=positions)
        rows = [tokenizer(t)["input_ids"] for t in TEXTS]
        width = max(map(len, rows))
        right = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        classifier(input_ids=right, attention_mask=(right != pad).long())
        classifier.config.pad_token_id = None
        for prompt in encode[:2]:
            generated = generate(model, prompt, torch.ones_like(prompt), 8, pad, eos)[0].tolist()
            loop, step = [], prompt
            for _ in range(len(generated)):
                loop.append(int(classifier(input_ids=step).logits[0].argmax()))
                step = torch.cat([step, torch.tensor([[loop[-1]]])], 1)
            assert loop == generated
    # padding invariance and batch independence
    batch_last = logits(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
    batch_generated = generate(model, ids, mask, 8, pad, eos)
    for row, prompt in enumerate(encode):
        assert torch.allclose(batch_last[row], first[row][0, -1], atol=1e-4)
        along = torch.cat([prompt, batch_generated[row : row + 1]], 1)
        assert logits(model, along)[0, prompt.shape[1] - 1 : -1].argmax(-1).tolist() == batch_generated[row].tolist()
    # ... and a left-padded batch of 16: the prompts and 13 random rows of 2 to the longest prompt's length
    ordinary = torch.tensor(sorted(set(range(high)) - set(tokenizer.all_special_ids)))
    longest = max(prompt.shape[1] for prompt in encode)
    lengths = [2 + (longest - 2) * index // 12 for index in range(13)]
    rows = [prompt[0].tolist() for prompt in encode] + [
        ordinary[torch.randint(0, len(ordinary), (n,))].tolist() for n in lengths
    ]
    for row in rows[3:]:
        logits(model, torch.tensor([row]), position_ids=torch.arange(len(row))[None])
    width = max(map(len, rows))
    big = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    big_mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    logits(model, big, attention_mask=big_mask, position_ids=(big_mask.cumsum(-1) - 1).clamp(min=0))
    for _ in range(2):
        other = torch.randint(0, high, encode[0].shape, generator=g)
        assert torch.allclose(logits(model, torch.cat([encode[0], other]))[0], first[0][0], atol=1e-4)
    others = torch.randint(0, high, (16, encode[0].shape[1]), generator=g)
    others[8] = encode[0][0]
    assert torch.allclose(logits(model, others)[8], first[0][0], atol=1e-4)
    # tokenizer and chat statics: round trip, what encode adds, markers, generation prompt, turn terminator
    for text in CORPUS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    answered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine."}], tokenize=False
    )
    prompted = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert answered.startswith(prompted)
    terminator = tokenizer(answered[answered.rfind("Fine.") + 5 :], add_special_tokens=False)["input_ids"][0]
    forced = generate(model, chat, torch.ones_like(chat), 3, pad, eos)  # the forced-terminator generate's cost
    return terminator, forced


def scored(model, ids, mask, n, pad, eos, prompt=None, **kwargs):
    """generate keeping every step's scores, and one forward along its tokens to compare them with."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
    new = out.sequences[:, -len(out.logits) :] if ids is not None else out.sequences
    prompt = ids if prompt is None else prompt
    along = logits(model, torch.cat([prompt, new], 1))[:, prompt.shape[1] - 1 : -1]
    assert torch.allclose(torch.stack(out.logits, 1).float(), along, atol=1e-4)
    return out


def path_probes(model, tokenizer):
    """The probes of the paths into generate: static cache, continuation, assisted, inputs_embeds, attention."""
    encode = [tokenizer(t, return_tensors="pt")["input_ids"] for t in TEXTS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    ones = torch.ones_like
    full = logits(model, encode[1])
    assert torch.allclose(logits(model, encode[1], logits_to_keep=3)[0], full[0, -3:], atol=1e-4)
    for prompt in (encode[2], encode[0]):  # static cache: a prompt, then a shorter one, then a padded batch
        scored(model, prompt, ones(prompt), 6, pad, eos, cache_implementation="static", disable_compile=True)
    ids, mask, _ = left_padded(tokenizer, TEXTS, pad)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            cache_implementation="static",
            disable_compile=True,
        )
    out = scored(model, encode[1], ones(encode[1]), 4, pad, eos, min_new_tokens=4)  # continuation, then a new turn
    turn = tokenizer(" And what does that mean for the dog?", add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    for appended in (None, turn):
        ids_ = out.sequences if appended is None else torch.cat([out.sequences, appended], 1)
        out = scored(model, ids_, ones(ids_), 4, pad, eos, min_new_tokens=4, past_key_values=out.past_key_values)
    scored(model, encode[1], ones(encode[1]), 8, pad, eos, assistant_model=model)
    repeating = tokenizer(" ".join([TEXTS[2]] * 2) + " The quick brown", return_tensors="pt")["input_ids"]
    scored(model, repeating, ones(repeating), 8, pad, eos, prompt_lookup_num_tokens=3)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(encode[1])
        assert torch.allclose(model(inputs_embeds=embeds).logits.float(), full, atol=1e-4)
    scored(model, None, ones(encode[1]), 6, pad, eos, inputs_embeds=embeds, prompt=encode[1])
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        logits(model, encode[1]), logits(model, ids, attention_mask=mask)
        generate(model, encode[1], ones(encode[1]), 6, pad, eos)


def checkpoint_probes(model, tokenizer):
    """The probes of the checkpoint as users get it: knows language, plain generate, far positions, chat turns,
    decoding as users read it (the loading report comes with the load)."""
    import math

    from transformers import TextStreamer

    prose = tokenizer(" ".join(TEXTS) * 4, return_tensors="pt")["input_ids"]
    block = torch.randperm(min(len(tokenizer), model.config.vocab_size), generator=torch.Generator().manual_seed(0))
    nll = [
        -logits(model, ids)[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        for ids in (prose, torch.cat([block[:48], block[:48]])[None])
    ]
    assert float(nll[0].mean()) < 0.5 * math.log(model.config.vocab_size)
    assert float(nll[1][48:].mean()) < 0.5 * float(nll[1][:47].mean())
    with torch.no_grad():
        model.generate(**tokenizer(TEXTS[0], return_tensors="pt"))
    window = tokenizer(TEXTS[2], return_tensors="pt")["input_ids"][:, :16]
    start = logits(model, window, position_ids=torch.arange(window.shape[1])[None])
    for offset in (2048, 4096, 8176):
        far = logits(model, window, position_ids=torch.arange(offset, offset + window.shape[1])[None])
        assert torch.nn.functional.kl_div(far.log_softmax(-1), start.log_softmax(-1), log_target=True) < 0.25
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Fine."},
        {"role": "user", "content": "?"},
    ]
    for end in (1, 3):
        rendered = tokenizer.apply_chat_template(turns[:end], tokenize=False, add_generation_prompt=True)
        assert all(rendered.count(m["content"]) >= 1 for m in turns[:end])
    answer = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert "<|im" not in tokenizer.decode(answer, skip_special_tokens=True)
    for text in CORPUS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        streamer = TextStreamer(tokenizer, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: None
        for token_id in ids:
            streamer.put(torch.tensor([token_id]))
        streamer.end()


def training_probes(model, tokenizer):
    """The training step's probes: labels on each row and on a right-padded batch, a backward pass with and
    without activation checkpointing (gradients for the embeddings only), and train() against eval()."""
    rows = [tokenizer(text, return_tensors="pt")["input_ids"] for text in TEXTS[:3]]
    with torch.no_grad():
        for ids in rows:
            model(input_ids=ids, labels=ids)
        width = max(ids.shape[1] for ids in rows)
        batch = torch.stack([torch.nn.functional.pad(ids[0], (0, width - ids.shape[1])) for ids in rows])
        mask = torch.stack([(torch.arange(width) < ids.shape[1]).long() for ids in rows])
        model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100))
    model.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    for checkpointing in (False, True):
        if checkpointing:
            on()
        model.train()
        model(input_ids=rows[0], labels=rows[0]).loss.backward()
        model.eval()
    off()
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits(model, rows[0]), model.train()(input_ids=rows[0]), model.eval()


def beam_probes(model, tokenizer):
    """The beam search probes: four beams with and without the cache, and one batched forward of the returned
    sequences to rebuild their scores."""
    from transformers import GenerationConfig

    for text in TEXTS[:2]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for use_cache in (True, False):
                config = GenerationConfig(
                    do_sample=False,
                    num_beams=4,
                    num_return_sequences=4,
                    max_new_tokens=8,
                    use_cache=use_cache,
                    return_dict_in_generate=True,
                    output_scores=True,
                    early_stopping=True,
                )
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
                if use_cache:
                    logits(model, out.sequences).log_softmax(-1)


REPEATING = "The quick brown fox jumps over the lazy dog. " * 2 + "The quick brown"


def by_hand(raw, history, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, penalty=1.1):
    """The sampling settings applied to one step's raw scores, as a careful script would check them."""
    scores = raw.clone()
    seen = torch.tensor(sorted(set(history)))
    scores[seen] = torch.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
    scores = scores / temperature
    scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    ordered, order = scores.sort(descending=True)
    probs = ordered.softmax(-1)
    removed = (probs.cumsum(-1) - probs) >= top_p
    scores = scores.masked_fill(removed.scatter(0, order, removed), float("-inf"))
    probs = scores.softmax(-1)
    return scores.masked_fill(probs < min_p * probs.max(), float("-inf"))


def sampling_probes(model, tokenizer):
    """The sampling probes: two seeded samples of two rows per prompt with scores kept, one forward per prompt
    over the sampled rows, the settings applied by hand at every step, and top_k=1 against greedy."""
    from transformers import GenerationConfig

    settings = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1}
    config = GenerationConfig(
        do_sample=True,
        num_return_sequences=2,
        max_new_tokens=8,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **settings,
    )
    for text in (TEXTS[0], REPEATING):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        for _ in range(2):
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        logits(model, out.sequences)
        for row in range(2):
            for step, raw in enumerate(out.logits):
                history = out.sequences[row, : ids.shape[1] + step].tolist()
                by_hand(raw[row].float(), history).log_softmax(-1)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        torch.manual_seed(0)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=1)


def block_mask(owner, dtype, shared=None):
    """An additive 4D mask: each token sees its own segment's earlier tokens (and the shared segment's)."""
    segment, index = torch.tensor(owner), torch.arange(len(owner))
    same = (segment[:, None] == segment[None, :]) | ((segment[None, :] == shared) if shared is not None else False)
    allowed = same & (index[None, :] <= index[:, None])
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def packing_probes(model, tokenizer):
    """The packing probes: each text alone, two rows packed by restarting position_ids, one row under a 4D
    block-causal mask, and two continuations sharing a prefix under one 4D mask against prefix + each alone."""
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    tails = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in (" I am fine, thank you.", " Woof! Where is my ball?")
    ]
    for row in rows:
        logits(model, torch.tensor([row]))
    orders = [[0, 1, 2], [2, 0, 1]]
    packed = torch.tensor([[t for k in order for t in rows[k]] for order in orders])
    positions = torch.tensor([[p for k in order for p in range(len(rows[k]))] for order in orders])
    logits(model, packed, position_ids=positions, use_cache=False)
    owner = [k for k, row in enumerate(rows) for _ in row]
    logits(
        model, packed[:1], position_ids=positions[:1], attention_mask=block_mask(owner, model.dtype), use_cache=False
    )
    prefix = rows[0]
    shared = torch.tensor([prefix + tails[0] + tails[1]])
    shared_positions = torch.tensor(
        [list(range(len(prefix))) + [len(prefix) + p for t in tails for p in range(len(t))]]
    )
    owner = [0] * len(prefix) + [i + 1 for i, t in enumerate(tails) for _ in t]
    mask = block_mask(owner, model.dtype, shared=0)
    logits(model, shared, position_ids=shared_positions, attention_mask=mask, use_cache=False)
    for tail in tails:
        logits(model, torch.tensor([prefix + tail]))


def long_prefill_probes(model, tokenizer, length):
    """The long prefill (opt-in for SmolLM2 on CPU): one forward of ``length`` tokens of repeated text, the same
    tokens through the cache in chunks of a quarter plus one and 3 single steps, and 3 prefixes alone; the
    scores kept at ~40 positions."""
    text = " ".join(TEXTS)
    ids = tokenizer(text)["input_ids"]
    while len(ids) < length:
        ids += tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids[:length]])
    keep = torch.arange(0, length, length // 40)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=keep)
        edges = [*range(0, length - 3, length // 4 + 1), *range(length - 3, length + 1)]
        cache = None
        for start, stop in itertools.pairwise(edges):
            out = model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        for end in (length // 5, length // 2, 2 * length // 3):
            model(input_ids=ids[:, :end], logits_to_keep=keep[keep < end])


def main(checkpoint: str, long_prefill: int = 0) -> float:
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model, _ = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    model.eval()
    sections = [probes, path_probes, checkpoint_probes, training_probes, beam_probes, sampling_probes, packing_probes]
    timed = [("load", time.perf_counter() - start)]
    for section in sections:
        began = time.perf_counter()
        section(model, tokenizer, checkpoint) if section is probes else section(model, tokenizer)
        timed.append((section.__name__, time.perf_counter() - began))
    if long_prefill:
        began = time.perf_counter()
        long_prefill_probes(model, tokenizer, long_prefill)
        timed.append(("long_prefill_probes", time.perf_counter() - began))
    # each section's time on stderr, to set against the suite's --durations
    print(", ".join(f"{name} {seconds:.2f} s" for name, seconds in timed), file=sys.stderr)
    return time.perf_counter() - start


if __name__ == "__main__":
    # python benchmarks/plain_probes.py CHECKPOINT [LONG_PREFILL_TOKENS]: the second as --causal-lm-long-prefill-tokens
    print(f"plain probes: {main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0):.2f} s")
