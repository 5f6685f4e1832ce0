"""Character-level tokenizer for the arithmetic task, in Hugging Face format.

One token per character, so step boundaries ("\\n") are always whole tokens and
`decode(encode(text)) == text`. No BOS is added: prompts are fed as they are.

It is a byte-level BPE with no merges. `AutoTokenizer` loads a Qwen2 checkpoint's tokenizer as
`Qwen2Tokenizer`, which rebuilds a byte-level BPE pipeline around the saved vocabulary; storing
characters in their byte-level form ("\\n" as "Ċ", " " as "Ġ") makes that rebuild and the saved
`tokenizer.json` tokenize identically.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = [PAD, EOS, UNK]  # UNK named so Qwen2Tokenizer does not add its own default
CHARS = "0123456789+-*/()=?A: \n" + string.ascii_lowercase + "BCDEFGHIJKLMNOPQRSTUVWXYZ.,;'!"  # task text and instructions


def _byte_level(ch: str) -> str:
    """The printable stand-in byte-level BPE uses for an ASCII character."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(ch)[
        0
    ][0]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer with ids 0..2 for `SPECIALS` and one id per character of `CHARS`, in order."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [_byte_level(c) for c in CHARS])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # batched generation continues from the right edge
        model_max_length=256,
    )


def save_char_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tok = build_char_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
