"""Tiny models the workbench builds itself: a locally trained tokenizer plus random weights.

No machine here can download weights, so tests and the default demo run on models made by
this module and saved as ordinary HF folders (`save_pretrained`, safetensors), then loaded
back through the normal `workbench.engine.models.load_model` path.

The tokenizer is byte-level BPE (GPT-2 style): " A" and "A" are distinct tokens, exactly
the trap docs/MEASUREMENT.md §2 describes. Llama-style tokenizers prepend BOS when called with
`add_special_tokens=True`; their chat template writes BOS itself, so chat prompts must be
tokenized without special tokens (tested).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

Arch = Literal["llama", "gpt2"]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A Jinja chat template in the style of real instruct models: it writes BOS itself."""

DEFAULT_CORPUS = (
    "Question: Which option do you choose?\nA. Agree\nB. Neutral\nC. Disagree\nAnswer: A",
    "I am 30 years old. Politically, I am a Democrat. I live in the Midwest.",
    "How would you rate the movie? 1 2 3 4 5 Strongly agree Somewhat disagree Don't know",
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    bos: bool = True,
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    Every single printable ASCII character (with and without a leading space) is added to the
    vocabulary so any label such as " A" or "7" is one token. `bos=True` makes the tokenizer
    prepend BOS on `add_special_tokens=True` (Llama style); `bos=False` is GPT-2 style.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    singles = [c for c in string.ascii_letters + string.digits]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [*texts, *DEFAULT_CORPUS, " ".join(singles), *(" " + c for c in singles)]
    tok.train_from_iterator(corpus, trainer=trainer)
    # Labels must be single tokens (" A", "A", " 7"); the corpus above makes BPE merge them.
    # (Adding them with `add_tokens` instead would split every word into characters.)
    for piece in [*singles, *(" " + c for c in singles)]:
        if len(tok.encode(piece, add_special_tokens=False).ids) != 1:
            raise ValueError(f"vocab_size {vocab_size} too small: {piece!r} is not one token")
    bos_id = tok.token_to_id(BOS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_config(arch: Arch, vocab_size: int, *, d_model: int = 64, n_layers: int = 2) -> object:
    """A small config: Llama with GQA and RoPE, or GPT-2 with learned positions."""
    if arch == "llama":
        return AutoConfig.for_model(
            "llama",
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=4,
            n_positions=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(f"unknown arch {arch!r}")


def build_tiny_model(
    out: str | Path,
    arch: Arch = "llama",
    *,
    seed: int = 0,
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    d_model: int = 64,
    n_layers: int = 2,
    init_std: float = 0.5,
) -> Path:
    """Build and save a random-weight model and its locally trained tokenizer to `out`.

    `init_std` is larger than HF's default so the random model has peaked, non-uniform
    next-token distributions (a uniform model would hide scoring bugs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size, bos=arch == "llama")
    config = tiny_config(arch, len(tokenizer), d_model=d_model, n_layers=n_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std / param.shape[-1] ** 0.5 * 4)
            elif "bias" in name:
                param.zero_()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def random_model(
    kind: str, vocab_size: int, *, n_layers: int = 2, sliding_window: int | None = None
) -> PreTrainedModel:
    """A tiny random-weight Mistral, Qwen2, Qwen3 or Gemma 3 built from its config (sdpa
    attention, seed 0, nothing downloaded): the architectures tests check beside Llama and
    GPT-2. `sliding_window`: every Mistral layer, or every other Gemma 3 layer (sliding then
    full, as in Gemma 3), attends only that many tokens back."""
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }  # fmt: skip
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    config = {
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=sliding_window),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **common,
            head_dim=8,
            sliding_window=sliding_window or 4096,
            layer_types=alternating if sliding_window else ["full_attention"] * n_layers,
        ),
    }[kind]()
    torch.manual_seed(0)
    model: PreTrainedModel = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()
