"""Chat at inference: prompts equal transformers' apply_chat_template(add_generation_prompt=True),
the end-of-turn stop, history trimming, and `jaxft chat` / `jaxft translate --chat` on a tiny
decoder-only HF folder (replies equal decoding the rendered prompts directly)."""

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.cli import main
from jaxft.config.schema import DecodeConfig, ModelConfig
from jaxft.data.chat import CHATML, LLAMA3, ChatEncoder
from jaxft.data.chat_messages import prompt_messages
from jaxft.eval import translate as translate_mod
from jaxft.eval.decode import decode_all
from jaxft.eval.translate import load_translator
from jaxft.interop.hf import abstract_params, save_hf

import test_chat_data
from test_chat_data import MESSAGES

PREFIXES = [MESSAGES[:2], MESSAGES[:4], MESSAGES[1:2], MESSAGES[1:4]]  # each ends with a user turn
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "models"
hf, sp = test_chat_data.hf, test_chat_data.sp  # fixtures: a byte-level BPE HF tokenizer, a SentencePiece one


@pytest.mark.parametrize("setting,template", [("chatml", CHATML), ("llama3", LLAMA3), (None, None)])
def test_prompt_ids_equal_transformers(hf, setting, template):
    hf_tok, tok = hf
    chat = ChatEncoder(tok, setting)  # None: the tokenizer's own template (LLAMA3, saved with it)
    for messages in PREFIXES:
        want = hf_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
        assert chat.prompt(messages) == list(want)
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", None: "<|eot_id|>"}[setting]
    assert chat.end_of_turn() == hf_tok.convert_tokens_to_ids(end)


def test_end_of_turn_of_other_templates(hf, sp):
    hf_tok, tok = hf
    eos_after = "{% for m in messages %}{{ m['content'] }} {{ eos_token if m['role'] == 'assistant' }}{% endfor %}"
    assert ChatEncoder(tok, eos_after).end_of_turn() == tok.eos_id  # "... </s>"-style (Llama 2, Mistral)
    assert ChatEncoder(tok, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}").end_of_turn() is None
    assert ChatEncoder(sp, "chatml").end_of_turn() == sp.piece_id("<|im_end|>")  # a SentencePiece symbol
    assert ChatEncoder(sp, eos_after).end_of_turn() == sp.eos_id  # </s>: a control piece, split out


def test_fit_drops_the_oldest_exchanges_and_keeps_the_system_prompt(hf):
    _, tok = hf
    chat = ChatEncoder(tok, "chatml")
    system, history = MESSAGES[:1], MESSAGES[1:4] + [{"role": "assistant", "content": "Yes."}] + MESSAGES[3:4]
    assert chat.fit(system + history, 10_000) == (chat.prompt(system + history), system + history, False)
    last = history[2:]  # the second exchange and the last user turn
    ids, kept, cut = chat.fit(system + history, len(chat.prompt(system + last)))
    assert (ids, kept, cut) == (chat.prompt(system + last), system + last, False)
    ids, kept, cut = chat.fit(system + history, 5)  # the last user turn alone is too long: its last tokens
    assert kept == system + history[-1:] and cut and ids == chat.prompt(kept)[-5:]
    with pytest.raises(ValueError, match="no room"):
        chat.fit(history, 0)


def test_prompt_messages_checks_inference_records():
    msgs = [{"role": "user", "content": "Hi"}]
    assert prompt_messages({"messages": msgs}, "f:1") == msgs
    assert prompt_messages({"messages": json.dumps(msgs)}, "f:1") == msgs
    for rec, needle in (({"messages": msgs + [{"role": "assistant", "content": "x"}]}, "f:1: the last message"),
                        ({"msgs": msgs}, "f:1: no 'messages' field"),
                        ({"messages": [{"role": "bot", "content": "x"}]}, "f:1: a message's role")):
        with pytest.raises(ValueError, match=needle):
            prompt_messages(rec, "f:1")


# --------------------------------------------------------------------------- a tiny chat model


def _random_params(cfg: ModelConfig):
    flat, _ = abstract_params(cfg)  # random numpy weights: no (slow) eager initialisation
    rng = np.random.default_rng(0)
    return nnx.from_flat_state([(p, v.replace(rng.normal(0, 0.5, v.shape).astype(np.float32))) for p, v in flat])


@pytest.fixture(scope="module")
def folders(hf, tmp_path_factory):
    """(decoder-only HF folder with the ChatML template, whose eos <|eot_id|> is not its end of turn;
    a T5 folder with the same tokenizer)."""
    hf_tok, _ = hf
    tmp = tmp_path_factory.mktemp("chatmodel")
    hf_tok.save_pretrained(tmp / "tok")
    (tmp / "tok" / "chat_template.jinja").write_text(CHATML, encoding="utf-8")  # wins over tokenizer_config
    vocab = len(hf_tok)
    cfg = ModelConfig(family="decoder", vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      mlp_dim=32, max_seq_len=96, dtype="float32")
    dec = save_hf(cfg, _random_params(cfg), tmp / "dec", tokenizer_path=tmp / "tok")
    t5 = dataclasses.replace(ModelConfig(**yaml.safe_load((PRESETS / "tiny-t5.yaml").read_text())["model"]),
                             vocab_size=vocab, n_layers=1, n_decoder_layers=1)
    return dec, save_hf(t5, _random_params(t5), tmp / "t5", tokenizer_path=tmp / "tok")


@pytest.fixture
def spy(monkeypatch):
    """The prompts (token ids) and configs every decode_all call of the translator received."""
    calls = []

    def recording(model, seqs, **kw):
        calls.append(([list(s) for s in seqs], kw["config"]))
        return decode_all(model, seqs, **kw)

    monkeypatch.setattr(translate_mod, "decode_all", recording)
    return calls


def _stdin(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"))


def _direct(translator, prompts, *, max_len: int, batch_size: int = 1) -> list[str]:
    """Greedy decoding of ``prompts`` until <|im_end|> (or eos), without it: what chat must print."""
    tok, end = translator.tokenizer, translator.chat_encoder().end_of_turn()
    cfg = DecodeConfig(strategy="greedy", max_len=max_len, n_best=1, eos_id=end, pad_id=tok.pad_id)
    out = []
    for best in decode_all(translator.model, prompts, config=cfg, batch_size=batch_size):
        tokens = best[0][0]
        out.append(tok.decode(tokens[:next((k for k, t in enumerate(tokens) if t in (end, tok.eos_id)),
                                           len(tokens))]))
    return out


def test_chat_through_a_pipe_replies_as_direct_decoding_with_the_history(folders, spy, monkeypatch, capsys):
    dec, _ = folders
    _stdin(monkeypatch, "Hello there\n\nHow are you?\n")  # the empty line is no turn
    assert main(["chat", str(dec), "--system", "Be brief.", "--max-len", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # not a terminal: no prompt, no info
    translator, _ = load_translator(str(dec))
    chat = translator.chat_encoder()
    assert chat.template.what.startswith("the chat template of") and chat.template.source == CHATML
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert len(spy) == 2 and spy[0][0] == [chat.prompt(first)]
    assert spy[0][1].eos_id == chat.end_of_turn() == translator.tokenizer.encode("<|im_end|>")[0]
    (reply1,) = _direct(translator, [chat.prompt(first)], max_len=6)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "How are you?"}]
    assert spy[1][0] == [chat.prompt(second)]  # the history (with the first reply) is in the second prompt
    (reply2,) = _direct(translator, [chat.prompt(second)], max_len=6)
    assert captured.out == f"{reply1}\n{reply2}\n"


def test_reply_stops_at_end_of_turn_or_eos(folders, monkeypatch):
    dec, _ = folders
    translator, _ = load_translator(str(dec))
    tok = translator.tokenizer
    end, a, b = tok.encode("<|im_end|>")[0], *tok.encode("Die Katze")[:2]
    # decode_all strips only the eos it stopped at; ids past the tokenizer (vocabulary padding) have no text
    canned = [[a, b, tok.eos_id, a], [a, end, b], [b, tok.vocab_size + 3, a]]
    seen = {}

    def fake(model, seqs, *, config, **kw):
        seen["config"] = config
        return [[(list(t), 0.0)] for t in canned]

    monkeypatch.setattr(translate_mod, "decode_all", fake)
    replies = translator.reply([[1], [2], [3]], DecodeConfig(strategy="greedy", n_best=1))
    assert seen["config"].eos_id == end and translator.stop_ids(True) == (end, tok.eos_id)
    assert replies == [tok.decode([a, b]), tok.decode([a]), tok.decode([b, a])]


def test_chat_messages_batch_mode(folders, spy, tmp_path, capsys):
    dec, _ = folders
    convs = [MESSAGES[:2], MESSAGES[1:2], MESSAGES[1:4]]
    lines = [json.dumps({"id": i, "messages": m}) for i, m in enumerate(convs)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")
    assert main(["chat", str(dec), "--messages", str(path), "--system", "Be brief.", "--batch-size", "2",
                 "--max-len", "5", "--quiet"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    translator, _ = load_translator(str(dec))
    chat = translator.chat_encoder()
    system = [{"role": "system", "content": "Be brief."}]
    prompts = [chat.prompt(m if m[0]["role"] == "system" else system + m) for m in convs]  # --system if none
    assert spy[0][0] == prompts
    want = _direct(translator, prompts, max_len=5, batch_size=2)
    assert [o["id"] for o in out] == [0, 1, 2] and [o["reply"] for o in out] == want
    assert [o["messages"] for o in out] == [m + [{"role": "assistant", "content": r}] for m, r in zip(convs, want)]
    # a bad record fails before the model loads, naming its line
    path.write_text(lines[0] + "\n" + json.dumps({"messages": MESSAGES[:3]}) + "\n", encoding="utf-8")
    assert main(["chat", str(dec), "--messages", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{path}:2: the last message is 'assistant'" in err[0]


def test_chat_refuses_an_encoder_decoder_in_one_line(folders, monkeypatch, capsys):
    _, t5 = folders
    _stdin(monkeypatch, "Hello\n")
    assert main(["chat", str(t5)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "encoder-decoder" in err[0] and "decoder-only" in err[0]
    assert main(["translate", str(t5), "--chat", "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn"]) == 2
    assert "decoder-only" in capsys.readouterr().err


def test_translate_and_eval_chat_wrap_each_line_as_a_user_turn(folders, spy, tmp_path, monkeypatch, capsys):
    dec, _ = folders
    _stdin(monkeypatch, "Hello there\nThe cat sleeps.\n")
    argv = ["translate", str(dec), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--strategy", "greedy",
            "--max-len", "5", "--quiet"]
    assert main(argv + ["--chat", "--chat-instruction", "Translate to {tgt_name}:"]) == 0
    out = capsys.readouterr().out
    translator, _ = load_translator(str(dec))
    chat = translator.chat_encoder()
    prompts = [chat.prompt([{"role": "user", "content": f"Translate to German:\n{t}"}])
               for t in ("Hello there", "The cat sleeps.")]
    assert spy[0][0] == prompts and spy[0][1].eos_id == chat.end_of_turn()
    assert out == "".join(r + "\n" for r in _direct(translator, prompts, max_len=5, batch_size=16))
    assert main(argv + ["--system", "Be brief."]) == 2  # chat flags need --chat
    assert "--system needs --chat" in capsys.readouterr().err
    # jaxft eval --chat scores with the same prompts
    (tmp_path / "src.txt").write_text("Hello there\nThe cat sleeps.\n", encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"eval": {"decode": {"strategy": "greedy", "max_len": 5}}}))
    spy.clear()
    assert main(["eval", str(tmp_path / "cfg.yaml"), "--model", str(dec), "--src", str(tmp_path / "src.txt"),
                 "--ref", str(tmp_path / "src.txt"), "--src-lang", "eng_Latn", "--tgt-lang", "deu_Latn", "--chat",
                 "--chat-instruction", "Translate to {tgt_name}:", "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    assert spy[0][0] == prompts
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["settings"]["tag_style"] == "chat"
