"""The lab's tiny models: HF format, loadable with AutoModelForCausalLM and AutoTokenizer,
built here without any download. Four models of different architectures, tokenizers and
chat templates, as the paper's pool is heterogeneous:

- alpha: Llama-style, byte-level BPE (384 tokens), Llama 3's header template   (teacher)
- beta:  Phi-3-style, byte-level BPE (640 tokens), Phi-3's ``<|user|>`` template (teacher)
- gamma: GPT-NeoX-style, byte-level BPE (512 tokens), ``[INST]`` template      (teacher)
- meta:  Qwen3-style, byte-level BPE (512 tokens), ChatML template whose generation
         prompt already opens ``<think>`` (as QwQ's)                           (meta-prover)
- student: GPT-2-style, byte-level BPE (448 tokens), Gemma's turn template      (student)

The student shares no architecture, vocabulary or chat template with the others: it is
what `cord-lab student` distills the traces into (`cord.lab.student`).

The paper's pool (R1-Distill, Phi-4-reasoning, QwQ as teachers and QwQ as meta-prover)
has the same shape: different architectures, tokenizers and chat templates.

`cord-lab train` trains them (models/); this module only builds them.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from cord.common import prompts
from cord.lab.arith import (
    LAB_TEMPLATE,
    final_answer_text,
    make_problems,
    solution_steps,
)

THINK_TOKENS = [prompts.THINK_OPEN, prompts.THINK_CLOSE]
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

TEMPLATES = {
    "alpha": (  # Llama 3
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "beta": (  # Phi-3
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "charlm": (
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    ),
    "gamma": (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    ),
    "student": (  # Gemma
        "{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "meta": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    ),
}


@dataclass(frozen=True)
class TinySpec:
    name: str
    arch: str  # llama | phi3 | gpt_neox | qwen3 | gpt2
    tokenizer: str  # bpe | char
    vocab_size: int  # BPE only
    specials: tuple[str, ...]  # (eos, pad, *others)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    # Heads of 32 on a hidden size of 64 (the attention is twice as wide as the model):
    # vLLM's CPU attention takes head sizes 32, 64, 80, ... only (a head of 16 kills its
    # engine on the first request), and two heads of 32 learned the lab's task several
    # times worse than four (final loss 0.15 against 0.03 for alpha). GPT-NeoX ties its
    # head size to hidden / heads, so gamma is twice as wide instead (`SPECS`).
    head_dim: int = 32
    context: int = 1024


SPECS = {
    "alpha": TinySpec(
        "alpha",
        "llama",
        "bpe",
        384,
        ("<|eot_id|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    "beta": TinySpec(
        "beta", "phi3", "bpe", 640, ("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>")
    ),
    "gamma": TinySpec("gamma", "gpt_neox", "bpe", 512, ("</s>", "<pad>"), hidden=128),
    "meta": TinySpec("meta", "qwen3", "bpe", 512, ("<|im_end|>", "<|pad|>", "<|im_start|>")),
    # GPT-2 ties its head size to hidden / heads: four heads of 16. The student is served
    # by the `hf` engine only (vLLM's CPU attention takes no head of 16).
    "student": TinySpec(
        "student", "gpt2", "bpe", 448, ("<end_of_turn>", "<pad>", "<start_of_turn>")
    ),
}
# Not trained: a GPT-2-style model with a character tokenizer, so the tests also cover
# learned absolute positions and a tokenizer with one token per character.
CHAR_SPEC = TinySpec("charlm", "gpt2", "char", 0, ("<|endoftext|>", "<|pad|>"))
TEACHERS = ("alpha", "beta", "gamma")
STUDENT = "student"


def corpus(n: int = 2000, seed: int = 10_000) -> list[str]:
    """Text in the lab's format, to fit the BPE merges on (a seed apart from the lab's)."""
    lines = [prompts.DEFAULT_TEMPLATE, LAB_TEMPLATE]
    for p in make_problems(n, seed):
        steps = solution_steps(p.terms)
        lines.append(p.question)
        lines.append(prompts.assistant_message(steps, final_answer_text(p.answer)))
        lines.append(prompts.scoring_context(steps) + prompts.answer_target(p.answer))
    return lines


def _wrap(tok: Tokenizer, spec: TinySpec) -> PreTrainedTokenizerFast:
    eos, pad = spec.specials[0], spec.specials[1]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=None,
        additional_special_tokens=list(spec.specials[2:]),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = TEMPLATES[spec.name]
    return fast


def char_tokenizer(spec: TinySpec) -> PreTrainedTokenizerFast:
    specials = [*spec.specials, "<unk>"]
    vocab = {t: i for i, t in enumerate([*specials, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(THINK_TOKENS)
    return _wrap(tok, spec)


def bpe_tokenizer(spec: TinySpec, text: Iterable[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    tok.add_tokens(THINK_TOKENS)
    return _wrap(tok, spec)


def build_tokenizer(spec: TinySpec, text: list[str] | None = None) -> PreTrainedTokenizerFast:
    if spec.tokenizer == "char":
        return char_tokenizer(spec)
    return bpe_tokenizer(spec, text if text is not None else corpus())


def head_size(spec: TinySpec) -> int:
    """The attention head size `build_model` gives `spec` (GPT-NeoX and GPT-2 tie it to
    hidden / heads)."""
    return spec.hidden // spec.heads if spec.arch in ("gpt_neox", "gpt2") else spec.head_dim


def build_model(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    ids = {
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.eos_token_id,
    }
    decoder = {
        "hidden_size": spec.hidden,
        "intermediate_size": spec.hidden * 3,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": True,
        **ids,
    }
    model: PreTrainedModel
    if spec.arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=spec.hidden,
                n_layer=spec.layers,
                n_head=spec.heads,
                n_positions=spec.context,
                # No dropout: it buys nothing at this size, and attention dropout
                # forces the slow attention path on the CPU (2x the step time).
                attn_pdrop=0.0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                **ids,
            )
        )
        model.config._attn_implementation = "sdpa"
    elif spec.arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(num_key_value_heads=max(1, spec.heads // 2), **decoder)
        )
    elif spec.arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(num_key_value_heads=spec.heads, **decoder))
    elif spec.arch == "gpt_neox":
        # Rotary on every head dimension (GPT-NeoX's default is a quarter): at this size
        # the quarter learns to copy the previous line several times slower.
        rope = {"rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rope_type": "default"}
        neox = {k: v for k, v in decoder.items() if k != "head_dim"}  # hidden / heads
        model = GPTNeoXForCausalLM(GPTNeoXConfig(rope_parameters=rope, **neox))
    elif spec.arch == "qwen3":
        model = Qwen3ForCausalLM(
            Qwen3Config(
                num_key_value_heads=max(1, spec.heads // 2),
                **decoder,
            )
        )
    else:
        raise ValueError(f"unknown arch {spec.arch!r}")
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build(
    spec: TinySpec, out: Path, seed: int, text: list[str] | None = None
) -> tuple[PreTrainedModel, Any]:
    """Build a random-weight model and its tokenizer, save both, and return the model
    with the tokenizer as `AutoTokenizer` loads it back (the class may differ from the
    one built: transformers picks it from the model type, e.g. Qwen2's)."""
    tok = build_tokenizer(spec, text)
    model = build_model(spec, tok, seed)
    save(model, tok, out)
    return model, AutoTokenizer.from_pretrained(out)
