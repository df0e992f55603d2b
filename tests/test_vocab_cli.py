"""`jaxft vocab extend|trim`, `model.init_from` of a grown folder, and `data.tokenizer.extend` at train start.

One tiny random Llama (transformers, built locally) with a 300-piece SentencePiece tokenizer trained
on the demo corpus and 20 padding rows (vocab_size 320) is the source throughout.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft.cli import main
from jaxft.config.schema import TokenizerConfig
from jaxft.data.tokenizer import Tokenizer, train_tokenizer
from jaxft.interop import convert
from jaxft.models.registry import build_model

from trainutil import LANGS, write_run_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOK, VOCAB = 300, 320


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(tmp, HF folder): the demo corpus, a tokenizer on it and a random Llama over it."""
    tmp = tmp_path_factory.mktemp("vocab")
    write_run_config(tmp)  # builds tmp/corpus
    texts = [line for lang in LANGS for line in (tmp / "corpus" / f"train.{lang}").read_text().splitlines()]
    hf_dir = tmp / "hf"
    train_tokenizer(texts, hf_dir / "tokenizer.model",
                    TokenizerConfig(train_vocab_size=TOK, byte_fallback=False, model_type="unigram"))
    assert Tokenizer.load(hf_dir / "tokenizer.model").vocab_size == TOK
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir, safe_serialization=True)
    return tmp, hf_dir


def _hf_arrays(hf_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    return model.model.embed_tokens.weight.detach().numpy(), model.lm_head.weight.detach().numpy()


def _jaxft_logits(folder, ids):
    cfg = dataclasses.replace(convert.read_model_yaml(folder / "model.yaml"), dtype="float32")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, convert.restore_params(folder / "params", cfg))
    return np.asarray(model(np.asarray([ids], np.int32)))[0]


def test_extend_tags_in_padding_rows_subword_init(base, capsys):
    tmp, hf_dir = base
    out = tmp / "ext"
    assert main(["vocab", "extend", str(hf_dir), "--out", str(out), "--langs", "yo", "ha", "--pieces", "Katze",
                 "<2yo>", "<s>", "--init", "subword"]) == 0
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["added"] == ["Katze", "<2yo>", "<2ha>"] and report["skipped"] == ["<s>"]
    # 303 pieces still fit the source's 320 rows (its alignment is 64): the padding rows are reused
    assert (report["before"]["vocab_size"], report["after"]["vocab_size"]) == (VOCAB, VOCAB)
    assert report["after"]["tokenizer_size"] == TOK + 3 and report["after"]["params"] == report["before"]["params"]
    assert "tokenizer pieces           300 -> 303" in capsys.readouterr().out
    old, new = Tokenizer.load(hf_dir / "tokenizer.model"), Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    assert [new.piece_id(p) for p in ("Katze", "<2yo>", "<2ha>")] == [300, 301, 302]
    assert new.encode("<2yo> Katze")[-1] == 300
    emb, head = _hf_arrays(hf_dir)
    params = convert.restore_params(out / "params", convert.read_model_yaml(out / "model.yaml"))
    e, k = np.asarray(params["embed"]["embedding"][...]), np.asarray(params["lm_head"]["kernel"][...])
    np.testing.assert_array_equal(e[:TOK], emb[:TOK])
    np.testing.assert_array_equal(e[303:], emb[303:])  # padding rows kept
    np.testing.assert_array_equal(k[:, :TOK], head[:TOK].T)
    # subword rule: the mean of the pieces "Katze" splits into (a word-internal piece: not the "▁"
    # SentencePiece puts in front of the text)
    parts = old.encode("Katze")
    assert old.id_to_piece(parts[0]) == "▁" and len(parts) > 2
    parts = parts[1:]
    np.testing.assert_allclose(e[300], emb[parts].mean(0), atol=1e-6)
    np.testing.assert_allclose(k[:, 300], head[parts].mean(0), atol=1e-6)
    unk = old._sp.unk_id()  # "<2yo>" splits into known pieces too: its own subword mean
    tag = [i for i in old.encode("<2yo>")[1:] if i != unk]
    assert len(tag) == 3  # "2", "y", "o"
    np.testing.assert_allclose(e[301], emb[tag].mean(0), atol=1e-6)
    # old ids on old text: the same logits
    ids = old.encode("Das Haus ist blau.")[:12]
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    hf_logits = hf_model(torch.tensor([ids])).logits[0].detach().numpy()
    np.testing.assert_allclose(_jaxft_logits(out, ids)[:, :TOK], hf_logits[:, :TOK], atol=2e-5)
    capsys.readouterr()
    assert main(["vocab", "extend", str(hf_dir), "--out", str(out), "--langs", "yo"]) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(["vocab", "extend", str(hf_dir), "--out", str(hf_dir / "inside"), "--langs", "yo"]) != 0
    assert "--out" in capsys.readouterr().err and not (hf_dir / "inside").exists()
    assert main(["vocab", "extend", str(hf_dir), "--out", str(tmp / "x"), "--init", "subword"]) != 0
    assert "nothing to add" in capsys.readouterr().err


def test_extend_from_corpus_grows_and_rounds(base):
    tmp, hf_dir = base
    corpus = tmp / "new_lang.txt"
    corpus.write_text("".join(f"Ọmọ náà ń ka ìwé {i % 7}. Àwọn ọmọdé ń ṣeré níta.\n" for i in range(200)))
    out = tmp / "learned"
    assert main(["vocab", "extend", str(hf_dir), "--out", str(out), "--from-corpus", str(corpus),
                 "--new-pieces", "40", "--langs", "yor_Latn", "--lang-tokens", "flores"]) == 0
    report = json.loads((out / "vocab_report.json").read_text())
    learned = report["learned"]
    assert report["added"] == ["yor_Latn"] and 10 <= len(learned) <= 40
    size = TOK + 1 + len(learned)
    assert report["after"]["tokenizer_size"] == size and report["after"]["vocab_size"] == -(-size // 64) * 64
    grown = report["after"]["vocab_size"] - VOCAB
    assert report["after"]["params"] - report["before"]["params"] == 2 * 32 * grown
    old, new = Tokenizer.load(hf_dir / "tokenizer.model"), Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    line = "Àwọn ọmọdé ń ka ìwé."
    assert len(new.encode(line)) < len(old.encode(line))  # the learned pieces segment the new language
    assert new.encode("The house is blue.") == old.encode("The house is blue.")
    e = np.asarray(convert.restore_params(out / "params", convert.read_model_yaml(out / "model.yaml"))
                   ["embed"]["embedding"][...])
    emb, _ = _hf_arrays(hf_dir)
    np.testing.assert_allclose(e[TOK:size], np.broadcast_to(emb[:TOK].mean(0), (size - TOK, 32)), atol=1e-6)
    np.testing.assert_allclose(e[VOCAB:], np.broadcast_to(emb[:TOK].mean(0), (grown, 32)), atol=1e-6)


def test_trim_same_logits_in_jaxft_and_transformers(base):
    tmp, hf_dir = base
    corpus = tmp / "corpus" / "dev.deu_Latn"
    out = tmp / "trim"
    old = Tokenizer.load(hf_dir / "tokenizer.model")
    seen = {i for line in corpus.read_text().splitlines() for i in old.encode(line)}
    unseen = next(old.id_to_piece(i) for i in range(TOK - 1, 0, -1) if i not in seen)
    assert main(["vocab", "trim", str(hf_dir), "--out", str(out), "--corpus", str(corpus), "--keep", unseen]) == 0
    report = json.loads((out / "vocab_report.json").read_text())
    kept = report["kept_ids"]
    assert set(kept) == seen | {0, 1, 2, 3, old.piece_id(unseen)}  # + pad/unk/bos/eos: 4 special pieces
    assert report["kept"] == len(kept) < TOK and report["removed"] == TOK - len(kept)
    assert report["after"]["vocab_size"] == -(-len(kept) // 64) * 64
    new = Tokenizer.load(out / "tokenizer" / "tokenizer.model")
    assert (new.bos_id, new.eos_id, new.pad_id) == (old.bos_id, old.eos_id, old.pad_id)
    text = corpus.read_text().splitlines()[0]
    old_ids, new_ids = old.encode(text)[:16], new.encode(text)[:16]
    assert [kept[i] for i in new_ids] == old_ids and new.decode(new_ids) == old.decode(old_ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    want = hf(torch.tensor([old_ids])).logits[0].detach().numpy()[:, kept]
    np.testing.assert_allclose(_jaxft_logits(out, new_ids)[:, :len(kept)], want, atol=2e-5)
    assert main(["convert", "jaxft-to-hf", str(out), str(tmp / "trim_hf")]) == 0
    trimmed = transformers.LlamaForCausalLM.from_pretrained(tmp / "trim_hf")
    got = trimmed(torch.tensor([new_ids])).logits[0].detach().numpy()
    assert got.shape[-1] == report["after"]["vocab_size"]
    np.testing.assert_allclose(got[:, :len(kept)], want, atol=2e-5)


def test_init_from_grown_folder_names_the_vocab_size(base, tmp_path):
    from jaxft.config.loader import load_config
    from jaxft.runs.model import params_from

    tmp, hf_dir = base
    out = tmp_path / "grown"
    main(["vocab", "extend", str(hf_dir), "--out", str(out), "--pieces", *[f"<x{i}>" for i in range(30)]])
    path = write_run_config(tmp, name="unused", extra={"data.tokenizer": {"path": str(out / "tokenizer")}})
    overrides = [f"model.init_from=run:{out}", "model.vocab_size=320", "model.max_seq_len=128",
                 "model.norm_eps=1e-6"]
    with pytest.raises(ValueError, match="model.vocab_size: the config says 320 but .* has 384 rows.*"
                                         "set model.vocab_size: 384"):
        params_from(f"run:{out}", load_config(path, overrides), None)
    state = params_from(f"run:{out}", load_config(path, overrides[:1] + ["model.vocab_size=384"] + overrides[2:]),
                        None)
    assert state["embed"]["embedding"][...].shape == (384, 32)


def test_train_extends_tokenizer_and_grows_rows_then_resumes(base):
    from jaxft.config.loader import load_config
    from jaxft.runs.tokenizer import run_tokenizer
    from jaxft.train.loop import train

    tmp, hf_dir = base
    extra = {"data.tokenizer": {"path": str(hf_dir / "tokenizer.model"), "extend": True},
             "data.lang_tokens": "t5_tag", "train.frozen": ["^embed/"]}
    path = write_run_config(tmp, steps=2, name="ext_run", extra=extra)
    overrides = [f"model.init_from=hf:{hf_dir}", f"model.vocab_size={VOCAB}", "model.max_seq_len=128",
                 "model.norm_eps=1e-6", "data.seq_len=48"]
    cfg = load_config(path, overrides)
    result = train(cfg, base_dir=tmp)
    tok = Tokenizer.load(result.run_dir / "tokenizer.model")
    tags = [f"<2{lang}>" for lang in ("deu_Latn", "eng_Latn", "rus_Cyrl")]
    assert tok.vocab_size == TOK + 3 and sorted(tok.piece_id(t) for t in tags) == [300, 301, 302]
    assert run_tokenizer(cfg.data, result.run_dir, tmp).vocab_size == TOK + 3  # eval / translate read the copy
    from jaxft.runs.model import restore_model

    emb = np.asarray(jax.device_get(restore_model(result.run_dir).rest["embed"]["embedding"][...]))
    hf_emb, _ = _hf_arrays(hf_dir)
    np.testing.assert_array_equal(emb[:TOK], hf_emb[:TOK])
    np.testing.assert_allclose(emb[TOK:TOK + 3], np.broadcast_to(hf_emb[:TOK].mean(0), (3, 32)), atol=1e-6)
    np.testing.assert_array_equal(emb[TOK + 3:], hf_emb[TOK + 3:])
    resumed = train(load_config(path, overrides + ["train.steps=3"]), base_dir=tmp)
    assert resumed.run_dir == result.run_dir
    assert Tokenizer.load(result.run_dir / "tokenizer.model").fingerprint == tok.fingerprint
    # a run dir is a source too: its latest checkpoint with the run's own (extended) tokenizer
    out = tmp / "from_run"
    assert main(["vocab", "extend", str(result.run_dir), "--out", str(out), "--pieces", "<2yor_Latn>"]) == 0
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["source_kind"] == "run" and report["tokenizer"] == str(result.run_dir / "tokenizer.model")
    assert (report["before"]["tokenizer_size"], report["after"]["tokenizer_size"]) == (TOK + 3, TOK + 4)
    grown = convert.restore_params(out / "params", convert.read_model_yaml(out / "model.yaml"))
    np.testing.assert_array_equal(np.asarray(grown["embed"]["embedding"][...])[:TOK + 3], emb[:TOK + 3])


def test_bpe_trim_keeps_merge_paths_and_t5_sentinels(tmp_path):
    """Data level, no model: a trimmed BPE tokenizer segments kept text as before (the pieces its
    merges pass through are kept); a T5 spiece.model gets its sentinels at T5's ids."""
    from jaxft.data.vocab import piece_counts, read_proto, trim_ids, trim_proto, write_proto
    from jaxft.interop.sp_adapters import load_sentencepiece
    from jaxft.runs.vocab_tokenizer import plain_proto, tokenizer_of

    words = "Haus Katze Katzenhaus blau Fluss Flusshaus laufen schnell grün Hund".split()
    texts = [" ".join(words[(i * j) % len(words)] for j in range(1, 9)) for i in range(200)]
    train_tokenizer(texts, tmp_path / "bpe.model", TokenizerConfig(train_vocab_size=120, model_type="bpe",
                                                                   byte_fallback=False))
    old = Tokenizer.load(tmp_path / "bpe.model")
    (tmp_path / "c.txt").write_text("Katzenhaus blau\nFlusshaus\n")
    proto = read_proto(tmp_path / "bpe.model")
    seen = np.nonzero(piece_counts(old, [tmp_path / "c.txt"]))[0].tolist()
    kept = trim_ids(proto, seen)
    assert len(kept) > len(set(seen) | {0, 1, 2, 3})  # intermediate merges kept too
    new = write_proto(trim_proto(proto, kept), tmp_path / "trim.model")
    for line in ("Katzenhaus blau", "Flusshaus", "blau Katzenhaus Flusshaus"):
        assert [kept[i] for i in new.encode(line)] == old.encode(line)
    with pytest.raises(ValueError, match="--keep: 'nope'"):
        trim_ids(proto, seen, ["nope"])
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "spiece.model").write_bytes((tmp_path / "bpe.model").read_bytes())
    t5 = load_sentencepiece(tmp_path / "t5" / "spiece.model")
    plain = tokenizer_of(plain_proto(tmp_path / "t5"))
    assert plain.vocab_size == t5.vocab_size == old.vocab_size + 100
    assert [plain.piece_id(f"<extra_id_{k}>") for k in (0, 99)] == [t5.piece_id("<extra_id_0>"),
                                                                    t5.piece_id("<extra_id_99>")]
    assert plain.encode("Katzenhaus") == t5.encode("Katzenhaus")
    assert plain.encode("Katzenhaus<extra_id_3>")[-1] == t5.piece_id("<extra_id_3>") == old.vocab_size + 96
