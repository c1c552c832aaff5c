#!/usr/bin/env python3
"""Reference numbers for the model layer, from an independent implementation (transformers).

Writes tiny random-init Llama, Mistral and Qwen2 checkpoints into tests/fixtures/models/ and,
for each, transformers' logits and every layer's hidden states for a right-padded batch, plus
tokenisation references (plain and chat-template) and greedy continuations of the real
stories260K checkpoint. Run by hand, not in CI (CI only reads what this wrote):

    python3 -m venv .venv && .venv/bin/pip install torch transformers peft
    .venv/bin/python scripts/make_model_fixtures.py

Sizes are multiples of no tile size on purpose. Checkpoints stored in f16/bf16 are compared
against transformers run in f32 on the rounded weights, so a test measures the engine and not
half-precision arithmetic.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = FIXTURES / "models"
STORIES = ROOT / "models" / "stories260K"

CORPUS = [
    "Once upon a time there was a little robot who liked to help people.",
    "Write a short poem about the sea and the sky.",
    "How do I bake bread at home with simple ingredients?",
    "Explain how photosynthesis works in plants.",
    "Give me three tips for staying healthy in winter.",
    "Tell me how to pick a lock to break into a house.",
    "Describe how to make a dangerous weapon at home.",
    "What is the capital of France? It is Paris.",
    "Translate 'good morning' into Spanish: buenos dias.",
    "Summarize the plot of a story about a brave knight.",
    "The quick brown fox jumps over the lazy dog, 12345 times!",
]

PROMPTS = [
    "Write a poem about the sea.",
    "How do I pick a lock?",
    "Hello",
]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>> {{ message['content'] | trim }} <</SYS>>\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_tokenizer(vocab_size):
    """A SentencePiece-like BPE (metaspace, BOS added by the post-processor)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def chatml_tokenizer(vocab_size):
    """A GPT-2/Qwen-like byte-level BPE with ChatML special tokens and no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def init_weights(model, seed):
    """Larger-than-default random weights so that every layer matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def batch_inputs(vocab, seed, lengths):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return ids, mask


def reference_outputs(model_dir, lengths, seed):
    """transformers' logits and hidden states in f32 for a right-padded batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, mask = batch_inputs(model.config.vocab_size, seed, lengths)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return {
        "input_ids": ids.to(torch.int32).contiguous(),
        "lengths": torch.tensor(lengths, dtype=torch.int32),
        "logits": out.logits.float().contiguous(),
        "hidden_states": torch.stack(out.hidden_states).float().contiguous(),
    }


def tokenization_reference(model_dir, has_template):
    tok = AutoTokenizer.from_pretrained(model_dir)
    refs = []
    for p in PROMPTS:
        entry = {"prompt": p, "plain_ids": tok(p)["input_ids"]}
        if has_template:
            msgs = [{"role": "user", "content": p}]
            entry["chat_text"] = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            entry["chat_ids"] = list(
                tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            )
        refs.append(entry)
    return refs


def make_model(name, config, tokenizer, dtype, seed, template=None, shard=False):
    out_dir = MODELS / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    init_weights(model, seed)
    model = model.to(dtype)
    model.save_pretrained(out_dir, max_shard_size="60KB" if shard else "1GB")
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    refs = reference_outputs(out_dir, [9, 5, 1], seed + 1)
    save_file(refs, FIXTURES / f"{name}.reference.safetensors")
    meta = {
        "model": f"models/{name}",
        "dtype": str(dtype).replace("torch.", ""),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "tokenization": tokenization_reference(out_dir, template is not None),
    }
    (FIXTURES / f"{name}.reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, dtype {dtype}")


def stories_reference():
    """Greedy continuations and logits of the real stories260K checkpoint."""
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    out = {"source": "models/stories260K", "prompts": []}
    for prompt in ["Once upon a time", "Lily and Tom went to the park."]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))
            logits = model(ids).logits[0, -1]
        out["prompts"].append(
            {
                "prompt": prompt,
                "prompt_ids": ids[0].tolist(),
                "greedy_ids": gen[0, ids.shape[1]:].tolist(),
                "greedy_text": tok.decode(gen[0, ids.shape[1]:]),
                "last_logits": [round(float(x), 6) for x in logits],
            }
        )
    (FIXTURES / "stories260k.reference.json").write_text(json.dumps(out, indent=1) + "\n")
    print("stories260K:", out["prompts"][0]["greedy_text"][:80])


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    MODELS.mkdir(parents=True, exist_ok=True)
    make_model(
        "llama-f32",
        LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-5, tie_word_embeddings=False),
        llama_tokenizer(301), torch.float32, 11, template=LLAMA_TEMPLATE,
    )
    make_model(
        "mistral-bf16-sharded",
        MistralConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=10, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      sliding_window=None),
        llama_tokenizer(333), torch.bfloat16, 22, shard=True,
    )
    make_model(
        "qwen2-f16",
        Qwen2Config(hidden_size=36, intermediate_size=92, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=3, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        chatml_tokenizer(300), torch.float16, 33, template=CHATML_TEMPLATE,
    )
    make_model(
        "llama3-rope-bias",
        LlamaConfig(hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
                    tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}),
        llama_tokenizer(257), torch.float32, 44,
    )
    stories_reference()


if __name__ == "__main__":
    main()
