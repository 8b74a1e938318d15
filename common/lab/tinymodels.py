"""Build the tiny models of the lab: HF format, loadable with AutoModelForCausalLM and
AutoTokenizer, no download. Three models of different architectures, tokenizers and
chat templates, as the paper's pool is heterogeneous:

- alpha: Llama-style, byte-level BPE tokenizer, ``<|user|>`` template
- beta:  GPT-2-style, character tokenizer, ``USER:``/``ASSISTANT:`` template
- meta:  Qwen2-style, byte-level BPE (its own vocabulary), ChatML template whose
         generation prompt already opens ``<think>`` (as QwQ's does): the meta-prover

    python -m cord.common.lab.tinymodels --out models   # random weights, seeded
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cord.common import prompts
from cord.common.lab.arith import final_answer_text, make_problems, solution_steps

THINK_TOKENS = [prompts.THINK_OPEN, prompts.THINK_CLOSE]
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))

TEMPLATES = {
    "alpha": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "beta": (
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    ),
    "meta": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    ),
}


@dataclass(frozen=True)
class TinySpec:
    name: str
    arch: str  # llama | gpt2 | qwen2
    tokenizer: str  # bpe | char
    vocab_size: int  # BPE only
    specials: tuple[str, ...]  # (eos, pad, *others)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 2048


SPECS = {
    "alpha": TinySpec(
        "alpha", "llama", "bpe", 384, ("<|end|>", "<|pad|>", "<|user|>", "<|assistant|>")
    ),
    "beta": TinySpec("beta", "gpt2", "char", 0, ("<|endoftext|>", "<|pad|>")),
    "meta": TinySpec("meta", "qwen2", "bpe", 320, ("<|im_end|>", "<|pad|>", "<|im_start|>")),
}


def corpus(n: int = 2000, seed: int = 10_000) -> list[str]:
    """Text in the lab's format, to fit the BPE merges on (seeds apart from the lab's)."""
    lines = [prompts.DEFAULT_TEMPLATE]
    for p in make_problems(n, seed):
        steps = solution_steps(p.terms)
        lines.append(p.question)
        lines.append(prompts.assistant_message(steps, final_answer_text(p.answer)))
        lines.append(prompts.scoring_context(steps) + p.answer)
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
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def build_model(spec: TinySpec, tok: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    ids = {
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": None,
    }
    model: PreTrainedModel
    if spec.arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=spec.hidden,
                n_layer=spec.layers,
                n_head=spec.heads,
                n_positions=spec.context,
                **ids,
            )
        )
    elif spec.arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=spec.hidden,
                intermediate_size=spec.hidden * 3,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=max(1, spec.heads // 2),
                max_position_embeddings=spec.context,
                tie_word_embeddings=True,
                **ids,
            )
        )
    elif spec.arch == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=spec.hidden,
                intermediate_size=spec.hidden * 3,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=max(1, spec.heads // 2),
                max_position_embeddings=spec.context,
                tie_word_embeddings=True,
                **ids,
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


def build_all(out_dir: Path, seed: int = 0, names: Iterable[str] = tuple(SPECS)) -> list[Path]:
    text = corpus()
    paths = []
    for offset, name in enumerate(names):
        spec = SPECS[name]
        tok = build_tokenizer(spec, text)
        model = build_model(spec, tok, seed + offset)
        save(model, tok, out_dir / name)
        paths.append(out_dir / name)
    return paths


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
def main(out_dir: Path, seed: int) -> None:
    """Build the tiny lab models with random (seeded) weights."""
    for path in build_all(out_dir, seed):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
