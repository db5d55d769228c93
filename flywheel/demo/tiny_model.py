"""The tiny-model factory: a small causal LM built from a config, for the demo and the tests.

Nothing here downloads. `build_tiny_model` trains a byte-level BPE tokenizer on a corpus and saves a small
randomly initialised Llama with it (safetensors), with a ChatML-style chat template; the demo trains its
production model from one and the tests use them as base models. `tiny_corpus` is a corpus for when the
caller has none. Loading and running the result is flywheel.inference.local_model.LocalModel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|im_end|>", "<|pad|>"
TURN_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, TURN_START]

# ChatML-style turns. The `{% generation %}` markers let transformers return an assistant-token mask
# (TRL's assistant_only_loss); the end-of-turn token sits inside them so the model learns to stop. The
# rendering of a prompt with add_generation_prompt is a prefix of the prompt plus its answer, which TRL
# relies on to find where a completion starts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] or '' }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_tiny_model(
    out_dir: Path | str,
    corpus: Iterable[str],
    *,
    vocab_size: int = 2000,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 256,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Train a byte-level BPE tokenizer on `corpus`, build a small Llama over it and save both (safetensors)
    to `out_dir`. The same corpus and seed give byte-identical files. Returns the folder.

    `init_std` is larger than transformers' 0.02 on purpose: LoRA does not touch the (tied) output layer
    and the final norm bounds the hidden state, so with 0.02 the logits of a tiny model can hardly move
    past uniform and an adapter learns next to nothing."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, so nothing is <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(_with_roles(corpus), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=max_len
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    return out


def _with_roles(corpus: Iterable[str]) -> Iterator[str]:
    # The role names appear in every rendered conversation; make sure they have compact tokens.
    yield from ("system\n", "user\n", "assistant\n", "tool\n")
    yield from corpus


def tiny_corpus() -> list[str]:
    """A small built-in corpus (customer-support phrasing) for a tiny model when the caller has none."""
    lines = [
        "Hello, how can I help you today?",
        "I would like a refund for my last order.",
        "Refunds are processed within five business days after we receive the item.",
        "Your order has shipped and will arrive on Tuesday.",
        "I cannot promise a refund, but I can open a review for you.",
        "Please share your order number so I can check the status.",
        "Our support team is available from nine to five on weekdays.",
        "The fee cannot be waived, but you can appeal through the billing page.",
        "Thank you for your patience. Is there anything else I can do?",
        "I have escalated your request to a human agent.",
    ]
    return lines * 3
