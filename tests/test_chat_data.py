"""task: chat -- chat templates, assistant-only loss masks, record checks, and a tiny training run."""

import json
import re

import numpy as np
import pytest

from jaxft.config.schema import DataConfig, SourceConfig, TokenizerConfig
from jaxft.data.chat import CHATML, LLAMA3, ChatFeaturizer, template_special_tokens
from jaxft.data.sources import DataError, Example, keyed_sources, read_source
from jaxft.data.tasks import OverlongError
from jaxft.data.tokenizer import train_tokenizer
from jaxft.data.vocab import required_pieces

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Translate to German: the cat sleeps."},
    {"role": "assistant", "content": "Die Katze schläft."},
    {"role": "user", "content": "Hello there, how are you?"},
    {"role": "assistant", "content": " Fine, thanks! And you?\n"},
]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
            "<|im_end|>", "<pad>"]


def _no_markers(template: str) -> str:
    return re.sub(r"{% (end)?generation %}", "", template)


def _example(messages=MESSAGES) -> Example:
    return Example("", json.dumps(messages, ensure_ascii=False), None, None, "chat", "chat.jsonl:1")


def _runs(ids, mask):
    """The runs of consecutive masked token ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers tokenizer, jaxft's tokenizer of the same folder): byte-level BPE built here,
    the Llama-3 template (with generation markers) saved as the folder's chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxft.interop.hf_tokenizer import load_hf_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in MESSAGES] * 20, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                  eos_token="<|eot_id|>", pad_token="<pad>")
    hf_tok.chat_template = LLAMA3
    folder = tmp_path_factory.mktemp("hf_tok")
    hf_tok.save_pretrained(folder)
    return hf_tok, load_hf_tokenizer(folder)


def _hf_reference(hf_tok, template=None):
    out = hf_tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_hf_tokenizer_template_ids_and_mask_equal_transformers(hf):
    hf_tok, tok = hf
    assert tok.chat_template == LLAMA3  # read from the saved folder
    ids, mask = _hf_reference(hf_tok)
    feat = ChatFeaturizer(tok, seq_len=256, chat_template=None, overlong="error")  # the tokenizer's template
    assert feat.encode(MESSAGES) == (ids, mask)
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|begin_of_text|>")
    # the loss is on exactly the two assistant turns: content (trimmed by the template) + <|eot_id|>
    assert [hf_tok.decode(r) for r in _runs(ids, mask)] == ["Die Katze schläft.<|eot_id|>",
                                                           "Fine, thanks! And you?<|eot_id|>"]
    out = feat(_example())
    np.testing.assert_array_equal(out["inputs"], ids[:-1])
    np.testing.assert_array_equal(out["targets"], ids[1:])
    np.testing.assert_array_equal(out["weights"], np.asarray(mask[1:], np.float32))
    assert out["inputs"].dtype == np.int32 and out["weights"].dtype == np.float32
    # prefix rendering (the template without markers) finds the same mask
    plain = ChatFeaturizer(tok, seq_len=256, chat_template=_no_markers(LLAMA3), overlong="error")
    assert not plain.template.markers and plain.encode(MESSAGES) == (ids, mask)


def test_chat_template_from_tokenizer_config(tmp_path):
    from jaxft.interop.hf_tokenizer import read_chat_template

    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "S"}))
    assert read_chat_template(tmp_path) == "S"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins, as in transformers
    assert read_chat_template(tmp_path) == "J"


@pytest.mark.parametrize("name,template", [("chatml", CHATML), ("llama3", LLAMA3)])
def test_builtin_templates_match_transformers(hf, name, template):
    hf_tok, tok = hf
    ids, mask = _hf_reference(hf_tok, template)
    assert ChatFeaturizer(tok, seq_len=256, chat_template=name, overlong="error").encode(MESSAGES) == (ids, mask)
    prefix = ChatFeaturizer(tok, seq_len=256, chat_template=_no_markers(template), overlong="error")
    assert prefix.encode(MESSAGES) == (ids, mask)
    # generation: the assistant header is the end of the prompt
    header = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    prompt = ChatFeaturizer(tok, seq_len=256, chat_template=name, overlong="error").prompt(MESSAGES[:2])
    assert prompt == hf_tok.apply_chat_template(MESSAGES[:2], chat_template=template, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
    assert hf_tok.decode(prompt).endswith(header[name])


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    texts = [m["content"] for m in MESSAGES] * 40 + ["system user assistant"] * 20
    symbols = template_special_tokens("chatml") + template_special_tokens("llama3")
    return train_tokenizer(texts, tmp_path_factory.mktemp("sp") / "t.model",
                           TokenizerConfig(train_vocab_size=300, model_type="bpe"), user_defined_symbols=symbols)


def test_sentencepiece_chatml_ids_are_the_rendered_text(sp):
    feat = ChatFeaturizer(sp, seq_len=256, chat_template="chatml", overlong="error")
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES)
    ids, mask = feat.encode(MESSAGES)
    assert ids == sp.encode(text)
    # (SentencePiece's normalizer reads the newline as a space)
    assert [sp.decode(r) for r in _runs(ids, mask)] == ["Die Katze schläft.<|im_end|>",
                                                        "Fine, thanks! And you? <|im_end|>"]
    assert sum(mask) == len(_runs(ids, mask)[0]) + len(_runs(ids, mask)[1])
    # worker processes get a pickled featurizer (the template as text, compiled again there)
    import pickle

    again = pickle.loads(pickle.dumps(feat))
    assert again.encode(MESSAGES) == (ids, mask) and again.template.source == CHATML
    # llama3 writes bos_token: SentencePiece's <s> is a control piece, so it becomes the bos id
    llama = ChatFeaturizer(sp, seq_len=256, chat_template="llama3", overlong="error")
    assert llama.encode(MESSAGES)[0][0] == sp.bos_id


def test_overlong_policies(sp):
    n = len(ChatFeaturizer(sp, seq_len=256, chat_template="chatml", overlong="error").encode(MESSAGES)[0])
    limit = n - 5
    with pytest.raises(OverlongError, match=f"conversation of {n - 1} tokens > data.seq_len={limit}"):
        ChatFeaturizer(sp, seq_len=limit, chat_template="chatml", overlong="error")(_example())
    skip = ChatFeaturizer(sp, seq_len=limit, chat_template="chatml", overlong="skip")
    assert skip(_example()) is None and skip.stats.overlong_skipped == 1
    assert skip.lengths([_example()]).tolist() == [[n - 1]]
    cut = ChatFeaturizer(sp, seq_len=limit, chat_template="chatml", overlong="truncate")
    out = cut(_example())
    assert len(out["inputs"]) == limit and cut.stats.truncated == 1 and out["weights"].sum() > 0
    # cut before the first assistant token: nothing to learn, skipped
    early = ChatFeaturizer(sp, seq_len=8, chat_template="chatml", overlong="truncate")
    assert early(_example()) is None and early.stats.overlong_skipped == 1


def test_template_errors_name_the_setting(sp, hf):
    with pytest.raises(DataError, match=r"data.chat_template: 'chatm' is neither a built-in template"):
        ChatFeaturizer(sp, seq_len=64, chat_template="chatm", overlong="skip")
    with pytest.raises(DataError, match=r"data.chat_template: not a valid Jinja template \(line 1"):
        ChatFeaturizer(sp, seq_len=64, chat_template="{% for m in messages %}", overlong="skip")
    with pytest.raises(DataError, match=r"data.chat_template: not set and tokenizer .* has no chat template"):
        ChatFeaturizer(sp, seq_len=64, chat_template=None, overlong="skip")
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"chat.jsonl:1: data.chat_template: no system"):
        ChatFeaturizer(sp, seq_len=64, chat_template=strict, overlong="skip")(_example())
    # a template that rewrites earlier turns (keeps only the last assistant turn) is not prefix-stable
    last_only = "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}" \
                "{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"chat.jsonl:1: data.chat_template: not prefix-stable at message 2"):
        ChatFeaturizer(hf[1], seq_len=256, chat_template=last_only, overlong="skip")(_example())


# --------------------------------------------------------------------------- records


def _jsonl(tmp_path, records, **kw):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return SourceConfig(type="jsonl", path=str(path), task="chat", name="chat", **kw)


def test_chat_records_are_checked_with_file_and_line(tmp_path):
    good = {"messages": MESSAGES, "id": 7}
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    no_content = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    src = _jsonl(tmp_path, [good, bad_role, no_content, no_answer, {"messages": "nope"}])
    exs, stats = read_source(src)
    assert len(exs) == 1 and json.loads(exs[0].tgt) == MESSAGES and exs[0].task == "chat" and exs[0].src == ""
    assert stats.skipped == {"role": 1, "content": 1, "no_assistant": 1, "messages": 1}
    with pytest.raises(DataError, match=r"chat.jsonl:2: a message's role is not system, user or assistant "
                                        r"\(data.train\[0\]; data.bad_lines: skip"):
        read_source(_jsonl(tmp_path, [good, bad_role]), bad_lines="error", key="data.train[0]")
    with pytest.raises(DataError, match=r"chat.jsonl:3: a message's content is missing or not text"):
        read_source(_jsonl(tmp_path, [good, good, no_content]), bad_lines="error")
    with pytest.raises(DataError, match=r"chat.jsonl:1: record lacks the messages field \(keys: \['conv'\]\); "
                                        r"set data.train\[0\].messages_field"):
        read_source(_jsonl(tmp_path, [{"conv": MESSAGES}]), key="data.train[0]")
    exs, _ = read_source(_jsonl(tmp_path, [{"conv": json.dumps(MESSAGES)}], messages_field="conv"))
    assert json.loads(exs[0].tgt) == MESSAGES  # the list may come as a JSON string
    with pytest.raises(DataError, match=r"data.train\[0\].type: task chat reads records .* not tsv"):
        keyed_sources([SourceConfig(type="tsv", path="chat.jsonl", task="chat")], tmp_path)


def test_prepare_writes_chat_records_that_read_back(tmp_path):
    import yaml

    from jaxft.data.prepare import prepare

    bad = {"messages": [{"role": "bot", "content": "x"}]}
    cfg = DataConfig(train=(_jsonl(tmp_path, [{"messages": MESSAGES}, bad, {"messages": MESSAGES[:3]}]),))
    manifest = prepare(cfg, tmp_path, tmp_path / "prepared")
    assert manifest["directions"][0]["examples"] == 2 and manifest["directions"][0]["skipped"] == {"role": 1}
    entry = yaml.safe_load((tmp_path / "prepared" / "sources.yaml").read_text())["data"]["train"][0]
    assert entry["type"] == "arrayrecord" and entry["task"] == "chat" and "src_field" not in entry
    exs, _ = read_source(SourceConfig(**entry))
    assert [json.loads(e.tgt) for e in exs] == [MESSAGES, MESSAGES[:3]]


def test_required_pieces_hold_the_template_tokens(tmp_path):
    cfg = DataConfig(train=(_jsonl(tmp_path, [{"messages": MESSAGES}]),), chat_template="chatml")
    assert required_pieces(cfg, tmp_path) == ["<|im_start|>", "<|im_end|>"]


def test_packed_pipeline_rows_carry_the_chat_mask(tmp_path, sp):
    from jaxft.data.pipeline import build_train_pipeline

    src = _jsonl(tmp_path, [{"messages": MESSAGES}] * 4)
    cfg = DataConfig(train=(src,), chat_template="chatml", seq_len=400, index_dir=str(tmp_path / "idx"))
    ids, mask = ChatFeaturizer(sp, seq_len=400, chat_template="chatml", overlong="error").encode(MESSAGES)
    assert 2 * len(ids) - 2 <= 400  # two conversations fit in a row
    row = {k: v[0] for k, v in next(build_train_pipeline(cfg, sp, global_batch=2, base_dir=tmp_path)).items()}
    for seg in (1, 2):
        at = row["segment_ids"] == seg
        np.testing.assert_array_equal(row["inputs"][at], ids[:-1])
        np.testing.assert_array_equal(row["weights"][at], mask[1:])
        np.testing.assert_array_equal(row["positions"][at], np.arange(len(ids) - 1))
    assert row["weights"][row["segment_ids"] == 0].sum() == 0


# --------------------------------------------------------------------------- training


def test_tiny_chat_training_run_learns(tmp_path):
    from jaxft.config.loader import load_config
    from jaxft.train.loop import train
    from trainutil import write_run_config

    rng = np.random.default_rng(0)
    words = "red green blue cat dog bird sun moon tree river".split()
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as f:
        for _ in range(64):
            q = " ".join(rng.choice(words, 3))
            f.write(json.dumps({"messages": [{"role": "system", "content": "Repeat the words."},
                                             {"role": "user", "content": q}, {"role": "assistant", "content": q},
                                             {"role": "user", "content": "again"},
                                             {"role": "assistant", "content": q}]}) + "\n")
    chat = [{"type": "jsonl", "path": "chat.jsonl", "task": "chat"}]
    path = write_run_config(tmp_path, steps=6, extra={"data.train": chat, "data.dev": chat,
                                                      "data.chat_template": "chatml", "data.seq_len": 128})
    result = train(load_config(path), base_dir=tmp_path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    from jaxft.data.tokenizer import Tokenizer

    tok = Tokenizer.load(result.run_dir / "tokenizer.model")  # trained with the template's tokens
    assert tok.piece_id("<|im_start|>") is not None and tok.piece_id("<|im_end|>") is not None
