"""Tiny causal LMs and tokenizers built locally, for tests: no network, fixed seeds.

Three families, covering the tokenizer styles of the contract:

* GPT-2 style: byte-level BPE trained here, no BOS added, "<|endoftext|>"
  as document separator.
* Llama style: a SentencePiece BPE model (byte fallback, dummy prefix)
  trained here, loaded through transformers' LlamaTokenizer, BOS added.
* Qwen2 style: byte-level BPE with Qwen2's pre-tokenizer regex, loaded
  through transformers' Qwen2Tokenizer, which (transformers 5) rebuilds the
  tokenizer with a Unicode NFC normalizer: a *normalizing* tokenizer.

Weights are random but drawn with a large init range, so predictions are far
from uniform and an off-by-one in the token shift changes scores visibly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(x, y):\n    return x + y\n\nprint(add(2, 3))",
    "Unicode: café naïve résumé — emoji 😀🎉 and CJK 你好世界 こんにちは 한국어.",
    "Combining marks: e\u0301 a\u0308 n\u0303; RTL: שלום مرحبا; zero width: a\u200db.",
    "Numbers 0123456789, punctuation ,.;:!?()[]{}<>\"' and tabs\tnewlines\n.",
    "Question: what is two plus two? Answer: four.",
    "<s> </s> <|endoftext|> are special token strings that users might type.",
] * 20

INIT_RANGE = 0.4
CONTEXT = 128


def build_bpe_tokenizer(path: Path):
    """GPT-2-style byte-level BPE tokenizer, saved to and loaded from ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "add_bos_token": False,
                "model_max_length": CONTEXT,
            }
        )
    )
    return AutoTokenizer.from_pretrained(str(path))


def build_sentencepiece_tokenizer(path: Path):
    """Llama-style SentencePiece tokenizer (BOS added), saved to and loaded from ``path``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": CONTEXT,
            }
        )
    )
    return AutoTokenizer.from_pretrained(str(path))


#: Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_qwen2_tokenizer(path: Path):
    """Qwen2-style tokenizer (byte-level BPE, NFC normalizer, no BOS), saved to and
    loaded from ``path`` through transformers' Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": CONTEXT,
            }
        )
    )
    return AutoTokenizer.from_pretrained(str(path))


def build_gpt2_model(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=CONTEXT,
        n_embd=48,
        n_layer=2,
        n_head=4,
        initializer_range=INIT_RANGE,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def build_llama_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        initializer_range=INIT_RANGE,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def build_qwen2_model(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        initializer_range=INIT_RANGE,
        bos_token_id=None,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


#: Each tokenizer family of the tests: its tokenizer builder (a directory in, a
#: tokenizer out) and its model builder (vocabulary size in).
FAMILY_BUILDERS = {
    "gpt2": (build_bpe_tokenizer, build_gpt2_model),
    "llama": (build_sentencepiece_tokenizer, build_llama_model),
    "qwen2": (build_qwen2_tokenizer, build_qwen2_model),
}


def make_engine(model, tokenizer, **limits):
    """A ScoringEngine on ``model`` with :class:`EngineLimits` ``limits``."""
    from pairscore_server.engine import EngineLimits, ScoringEngine
    from pairscore_server.engine.engine import ModelDescription

    return ScoringEngine(
        model,
        tokenizer,
        description=ModelDescription(name="tiny", source="test:tiny", server_version="test"),
        limits=EngineLimits(**limits),
    )


#: The small ChatML-like chat template shipped with the tests (trims each content).
CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "chatml_tiny.jinja"
#: Its control tokens, added to the tiny tokenizers as special tokens.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def with_chat_template(tokenizer):
    """Give a tiny tokenizer ChatML's control tokens (as special tokens) and the test
    chat template, in place; returns it. Build its model with ``len(tokenizer)`` after."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()
    return tokenizer
