import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ibtpo_fast.data import PromptRow, PromptStream, encode_prompt, load_files, load_rows

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2=?"}]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(chat_template: str | None = None, bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable character; optionally a chat template or a BOS the tokenizer adds."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>" if bos else None
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


VERL = [
    {"data_source": "gsm8k", "prompt": CHAT, "reward_model": {"style": "rule", "ground_truth": "3"},
     "extra_info": {"split": "train", "index": 7}},
    {"data_source": "math", "prompt": "What is 2*3?", "reward_model": {"ground_truth": "6"}},
]


def check_verl_rows(rows, path):
    assert rows[0] == PromptRow(CHAT, "3", "gsm8k", {"split": "train", "index": 7}, 0)
    assert rows[1] == PromptRow("What is 2*3?", "6", "math", {}, 1)
    assert rows[0].file == str(path)


def test_verl_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", VERL)
    check_verl_rows(load_rows(path), path)


def test_verl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # a parquet column has one type: chat prompts in one file, string prompts in another
    chat, text = tmp_path / "chat.parquet", tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pylist([VERL[0], {**VERL[0], "prompt": CHAT[1:]}]), chat)
    pq.write_table(pa.Table.from_pylist([VERL[1]]), text)
    rows = load_rows(chat)
    assert rows[0] == PromptRow(CHAT, "3", "gsm8k", {"split": "train", "index": 7}, 0)
    assert rows[1].prompt == CHAT[1:] and rows[1].index == 1
    assert load_rows(text) == [PromptRow("What is 2*3?", "6", "math", {}, 0)]
    with pytest.raises(ValueError, match=r"bad.parquet row 2: missing 'answer'"):
        pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]),
                       tmp_path / "bad.parquet")
        load_rows(tmp_path / "bad.parquet")


def test_plain_rows_json_list_and_multiple_files(tmp_path):
    a = write_jsonl(tmp_path / "arith.jsonl", [{"prompt": "1+1=", "answer": 2}, "", {"prompt": "2+2=", "answer": "4"}])
    b = tmp_path / "more.json"
    b.write_text(json.dumps([{"prompt": "3+3=", "answer": "6", "data_source": "x"}]))
    rows = load_files(f"{a}, {b}")
    assert [(r.prompt, r.ground_truth, r.data_source, r.index) for r in rows] == [
        ("1+1=", "2", "arith", 0), ("2+2=", "4", "arith", 1), ("3+3=", "6", "x", 0)]
    assert load_rows(a, default_source="calc")[0].data_source == "calc"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "answer": ', "line 2: invalid JSON"),
    ('{"answer": "1"}', "line 2: missing 'prompt'"),
    ('{"prompt": "a"}', "line 2: missing 'answer'"),
    ('{"prompt": "a", "reward_model": {"style": "rule"}}', "line 2: 'reward_model' must be an object with a 'ground_truth'"),
    ('{"prompt": 5, "answer": "1"}', "line 2: 'prompt' must be a string or a non-empty chat list"),
    ('{"prompt": "", "answer": "1"}', "line 2: empty 'prompt'"),
    ('{"prompt": [{"role": "user"}], "answer": "1"}', "line 2: 'prompt' message 0 must be an object"),
    ('{"prompt": "a", "answer": ["1"]}', "line 2: 'answer' must be a string or a number"),
    ('{"prompt": "a", "answer": "1", "data_source": 3}', "line 2: 'data_source' must be a string"),
    ('{"prompt": "a", "answer": "1", "extra_info": [1]}', "line 2: 'extra_info' must be an object"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok", "answer": "1"}', line])
    with pytest.raises(ValueError) as err:
        load_rows(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_empty_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_rows(empty)
    with pytest.raises(ValueError, match="unsupported data file type"):
        load_rows(write_jsonl(tmp_path / "rows.csv", ["a,b"]))
    with pytest.raises(ValueError, match="no such data file"):
        load_rows(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="row 2"):
        (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "a", "answer": 1}, {"prompt": "b"}]))
        load_rows(tmp_path / "bad.json")


def test_encode_chat_with_template():
    tok = char_tokenizer(TEMPLATE)
    ids = encode_prompt(PromptRow(CHAT, "3", "s", {}, 0), tok, 100)
    assert tok.decode(ids) == "<system>Be brief.\n<user>1+2=?\n<assistant>"


def test_encode_without_template_and_bos():
    row = PromptRow(CHAT, "3", "s", {}, 0)
    assert char_tokenizer().decode(encode_prompt(row, char_tokenizer(), 100)) == "Be brief.\n1+2=?"
    bos_tok = char_tokenizer(bos=True)
    ids = encode_prompt(PromptRow("1+2=", "3", "s", {}, 0), bos_tok, 100)
    assert ids[0] == bos_tok.bos_token_id and bos_tok.decode(ids[1:]) == "1+2="
    assert encode_prompt(PromptRow("1+2=", "3", "s", {}, 0), char_tokenizer(TEMPLATE), 100) == char_tokenizer().encode("1+2=")


def test_encode_too_long_names_row(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x", "answer": "1"}, {"prompt": "y" * 50, "answer": "1"}])
    row = load_rows(path)[1]
    with pytest.raises(ValueError) as err:
        encode_prompt(row, char_tokenizer(), 20)
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and "50 tokens" in msg and "max_prompt_tokens=20" in msg


def test_encode_empty_result():
    class NoTokens:
        chat_template = None
        bos_token = None

        def encode(self, text, add_special_tokens):
            return []

    with pytest.raises(ValueError, match="no tokens"):
        encode_prompt(PromptRow("z", "1", "s", {}, 3), NoTokens(), 10)


def test_stream_deterministic_epochs_and_resume():
    rows = list(range(10))
    a = PromptStream(rows, batch_size=3, seed=7)
    first = [a.next_batch() for _ in range(7)]
    b = PromptStream(rows, batch_size=3, seed=7)
    assert [b.next_batch() for _ in range(7)] == first
    # each epoch: 3 disjoint batches of distinct rows, order differing between epochs
    epoch0 = sum(first[:3], [])
    assert len(set(epoch0)) == 9 and sum(first[3:6], []) != epoch0
    assert PromptStream(rows, 3, seed=8).next_batch() != first[0] or PromptStream(rows, 3, 9).next_batch() != first[0]

    c = PromptStream(rows, batch_size=3, seed=7)
    for _ in range(4):
        c.next_batch()
    state = c.state_dict()
    assert state == {"epoch": 1, "position": 3}
    resumed = PromptStream(rows, batch_size=3, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_batch() for _ in range(3)] == first[4:7]


def test_stream_rejects_bad_sizes():
    with pytest.raises(ValueError, match="larger than the data"):
        PromptStream([1, 2], batch_size=3, seed=0)
    with pytest.raises(ValueError, match="invalid PromptStream state"):
        PromptStream([1, 2], batch_size=1, seed=0).load_state_dict({"epoch": 0, "position": 5})
