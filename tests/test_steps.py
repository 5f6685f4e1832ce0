"""split_steps on real tokenizers: a byte-level BPE trained here, and a char-level one."""
import string

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ibtpo_fast import split_steps

CORPUS = [
    "First, add the numbers.\n\nThen multiply.\n\nSo the answer is 42.",
    "We know x = 3.\n\nHence y = 6.\n\nTherefore z = 9.\n\n",
    "Step one.\nStep two.\n\nDone.",
] * 50


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    # Words, and punctuation with its trailing newlines (as Qwen's pre-tokenizer groups ".\n\n").
    words = Regex(r" ?\w+| ?[^\w\s]+\n*|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(words, "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def chars():
    vocab = {c: i for i, c in enumerate(sorted(set("".join(CORPUS)) | set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def decode_steps(tok, text, delim="\n\n", **kw):
    ids = tok.encode(text, add_special_tokens=False)
    steps = split_steps(ids, tok, delim, **kw)
    assert sum(steps, []) == list(ids)  # steps partition the response
    return [tok.decode(s) for s in steps]


@pytest.mark.parametrize("tok_name", ["bpe", "chars"])
def test_splits_on_delimiter(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    text = "We know x = 3.\n\nHence y = 6.\n\nTherefore z = 9."
    assert decode_steps(tok, text) == ["We know x = 3.\n\n", "Hence y = 6.\n\n", "Therefore z = 9."]


def test_delimiter_inside_a_larger_token(bpe):
    ids = bpe.encode("Then multiply.\n\nDone.", add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    assert any(p.endswith(".\n\n") or (len(p) > 2 and "\n\n" in p) for p in pieces), pieces  # BPE merged it
    assert decode_steps(bpe, "Then multiply.\n\nDone.") == ["Then multiply.\n\n", "Done."]


def test_single_newline_delimiter_and_trailing_delimiter(chars):
    assert decode_steps(chars, "Step one.\nStep two.\n\nDone.", "\n") == ["Step one.\n", "Step two.\n", "\n", "Done."]
    assert decode_steps(chars, "Hence y = 6.\n\n") == ["Hence y = 6.\n\n"]


def test_no_delimiter_is_one_step(bpe):
    assert decode_steps(bpe, "So the answer is 42.") == ["So the answer is 42."]
    assert split_steps([], bpe) == []


def test_min_step_tokens_merges_short_steps(chars):
    # "x.\n\n" (4 chars) is shorter than 5: merged into the next step; the short tail "z." has no
    # next step, so it joins the previous one.
    text = "x.\n\nHence y = 6.\n\nz.\n\nAnd then w = 12."
    assert decode_steps(chars, text, min_step_tokens=5) == ["x.\n\nHence y = 6.\n\n", "z.\n\nAnd then w = 12."]
    assert decode_steps(chars, "Hence y = 6.\n\nz.", min_step_tokens=5) == ["Hence y = 6.\n\nz."]


def test_empty_delimiter_rejected(chars):
    with pytest.raises(ValueError, match="delimiter"):
        split_steps([1, 2], chars, "")
