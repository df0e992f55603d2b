"""LoRA: adapters as a variable type attached by tree surgery.  Invariants: the
adapted model equals the base at init, merge == unmerged forward and unmerge
restores the kernels, only the named adapter trains (and alone has optimizer
state), adapters are sharded like their kernels, adapter-only checkpoints
resume exactly, stacking, and HF PEFT export parity."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxft.config.loader import load_config
from jaxft.config.schema import LoraConfig, MeshConfig, ModelConfig, OptimizerConfig, PeftConfig, TrainConfig
from jaxft.models.registry import build_model
from jaxft.peft.lora import (LoRAParam, adapters, apply_lora, load_adapter,
                             merge_adapter_dir_into, merge_lora, save_adapter, unmerge_lora)
from jaxft.sharding import batch_sharding, make_mesh, use_mesh
from jaxft.train.optim import make_optimizer, make_schedule
from jaxft.train.state import init_train_state, make_init_fn, path_str
from jaxft.train.step import jit_train_step, make_train_step

from trainutil import write_run_config

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, dtype="float32",
                   max_seq_len=64)
ALL = (r"attn/(q|k|v|o)/kernel$", r"mlp/(gate|up|down)/kernel$")
OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)


def ids(seed=0, shape=(2, 10), vocab=TINY.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, shape), jnp.int32)


def randomize_b(model, name=None, seed=0, std=0.1):
    for i, (_, _, _, ad) in enumerate(adapters(model, name)):
        ad.b.set_value(std * jax.random.normal(jax.random.key(seed * 1000 + i), ad.b.shape, ad.b.dtype))


def kernels(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {path_str(p): np.asarray(v.get_value()) for p, v in flat if p[-1] == "kernel"}


def test_init_equals_base_merge_equals_unmerged_and_unmerge_restores():
    model = build_model(TINY, rngs=nnx.Rngs(0))
    x = ids()
    base, base_k = np.asarray(model(x)), kernels(model)
    apply_lora(model, LoraConfig(rank=4, targets=ALL), rngs=nnx.Rngs(1))
    paths = {p for p, _, _, _ in adapters(model)}
    assert paths == {f"layers/{i}/{m}" for i in range(2) for m in
                     ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")}
    np.testing.assert_array_equal(np.asarray(model(x)), base)  # b = 0
    q = model.layers[0].attn.q.lora["default"]
    assert q.a.shape == (32, 4) and q.b.shape == (4, 4, 8) and isinstance(q.a, LoRAParam)
    assert q.a.get_metadata()["out_sharding"] == ("embed", None)
    assert q.b.get_metadata()["out_sharding"] == (None, "heads", "head_dim")
    randomize_b(model)
    adapted = np.asarray(model(x))
    assert np.abs(adapted - base).max() > 1e-2
    merge_lora(model)
    assert np.abs(kernels(model)["layers/0/attn/q/kernel"] - base_k["layers/0/attn/q/kernel"]).max() > 0
    np.testing.assert_allclose(np.asarray(model(x)), adapted, atol=1e-5)
    unmerge_lora(model)
    for k, v in kernels(model).items():
        np.testing.assert_allclose(v, base_k[k], atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(x)), adapted, atol=1e-5)


def test_errors_name_the_config_key():
    model = build_model(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="peft.lora.targets"):
        apply_lora(model, LoraConfig(targets=("nomatch",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="peft.lora.dropout"):
        apply_lora(model, LoraConfig(dropout=1.0), rngs=nnx.Rngs(1))


def test_gaussian_init_std():
    model = build_model(TINY, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=8, init="gaussian", targets=(r"mlp/up/kernel$",)), rngs=nnx.Rngs(1))
    a = np.concatenate([np.asarray(ad.a.get_value()).ravel() for _, _, _, ad in adapters(model)])
    assert abs(a.std() - 1 / 8) < 0.02


def make_batch(rows=8, length=16, seed=0):
    tokens = np.random.default_rng(seed).integers(1, TINY.vocab_size, size=(rows, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((rows, length), np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}


def lora_state(lcfg: LoraConfig, mesh_cfg: MeshConfig, steps: int = 0):
    peft = PeftConfig(method="lora", lora=lcfg)
    tx = make_optimizer(OPT, 10)
    init_fn, graphdef = make_init_fn(TINY, TrainConfig(), tx, 0, peft)
    mesh = make_mesh(mesh_cfg)
    with use_mesh(mesh):
        state0, shardings = init_train_state(init_fn, mesh)
        state = state0
        if steps:
            step = jit_train_step(make_train_step(graphdef, tx, TrainConfig(), make_schedule(OPT, 10)),
                                  shardings, batch_sharding(mesh))
            state0 = jax.device_get(state0)  # the step donates its input
            for s in range(steps):
                state, _ = step(state, jax.device_put(make_batch(seed=s), batch_sharding(mesh)))
    return state0, state, graphdef


def test_only_adapters_train_and_have_optimizer_state():
    state0, state, _ = lora_state(LoraConfig(rank=4, targets=ALL), MeshConfig(data=-1), steps=2)
    trainable = [path_str(p) for p, _ in nnx.to_flat_state(state0.params)]
    assert trainable and all("/lora/default/" in p for p in trainable)
    assert len(trainable) == 2 * 7 * 2  # a and b on 7 Linears x 2 layers
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state0.params))
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state0.rest))
    n_adapter = sum(x.size for x in jax.tree.leaves(state0.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state0.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter  # AdamW mu and nu for the adapters only
    for a, b in zip(jax.tree.leaves(state0.rest), jax.tree.leaves(jax.device_get(state.rest))):
        np.testing.assert_array_equal(a, b)  # base weights bitwise unchanged (weight decay on)
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state0.params),
                                                       jax.tree.leaves(jax.device_get(state.params)))]
    assert all(moved)


def test_adapters_sharded_like_their_kernels():
    _, state, _ = lora_state(LoraConfig(rank=4), MeshConfig(data=2, fsdp=2, tensor=2))
    q = state.params["layers"][0]["attn"]["q"]["lora"]["default"]
    assert q["a"].get_value().sharding.spec == P("fsdp", None)  # embed -> fsdp
    assert q["b"].get_value().sharding.spec == P(None, "tensor", None)  # heads -> tensor
    o = state.params["layers"][1]["attn"]["o"]["lora"]["default"]
    assert o["a"].get_value().sharding.spec == P("tensor", None, None)
    assert o["b"].get_value().sharding.spec == P(None, "fsdp")


def test_save_load_and_stacking(tmp_path):
    # a "language" adapter, saved
    lang = build_model(TINY, rngs=nnx.Rngs(0))
    apply_lora(lang, LoraConfig(rank=4, name="lang", targets=ALL), rngs=nnx.Rngs(1))
    randomize_b(lang, seed=1)
    x = ids()
    want_lang = np.asarray(lang(x))
    lang_dir = save_adapter(tmp_path / "lang", lang, LoraConfig(rank=4, name="lang", targets=ALL), TINY)
    assert (lang_dir / "adapter.json").is_file() and (lang_dir / "peft" / "adapter_config.json").is_file()
    # loaded into a fresh base: same function
    fresh = build_model(TINY, rngs=nnx.Rngs(0))
    load_adapter(fresh, lang_dir)
    np.testing.assert_allclose(np.asarray(fresh(x)), want_lang, atol=1e-6)
    # composing (merging the file into the kernels) gives it too, with no adapter left
    composed = merge_adapter_dir_into(build_model(TINY, rngs=nnx.Rngs(0)), lang_dir)
    assert not list(adapters(composed))
    np.testing.assert_allclose(np.asarray(composed(x)), want_lang, atol=1e-5)

    # a task adapter stacked on it: lang frozen, task trains
    task = LoraConfig(rank=2, name="task", load=(str(lang_dir),))
    state0, state, graphdef = lora_state(task, MeshConfig(data=-1), steps=2)
    trainable = [path_str(p) for p, _ in nnx.to_flat_state(state0.params)]
    frozen_lora = [path_str(p) for p, v in nnx.to_flat_state(state0.rest) if isinstance(v, LoRAParam)]
    assert trainable and all("/lora/task/" in p for p in trainable)
    assert len(frozen_lora) == 2 * 7 * 2 and all("/lora/lang/" in p for p in frozen_lora)
    for a, b in zip(jax.tree.leaves(state0.rest), jax.tree.leaves(jax.device_get(state.rest))):
        np.testing.assert_array_equal(a, b)
    stacked = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))
    got = np.asarray(stacked(x))
    # base + lang term + task term, by hand
    by_hand = build_model(TINY, rngs=nnx.Rngs(0))
    deltas = {}
    for path, _, name, ad in adapters(stacked):
        a, b = np.asarray(ad.a.get_value()), np.asarray(ad.b.get_value())
        d = ad.scale * (a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1))
        deltas[path] = deltas.get(path, 0) + d.reshape(a.shape[:-1] + b.shape[1:])
    assert {n for _, _, n, _ in adapters(stacked)} == {"lang", "task"}
    for path, lin in [(p, m) for p, m in nnx.iter_modules(by_hand) if path_str(p) in deltas]:
        lin.kernel.set_value(lin.kernel.get_value() + deltas[path_str(path)])
    np.testing.assert_allclose(got, np.asarray(by_hand(x)), atol=1e-5)
    assert np.abs(got - want_lang).max() > 1e-4  # the task adapter moved


def lora_run_config(tmp: Path, name: str) -> Path:
    path = write_run_config(tmp, steps=6, name=name)
    cfg = yaml.safe_load(path.read_text())
    cfg["peft"] = {"method": "lora", "save_base": False, "lora": {"rank": 2, "alpha": 4.0}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_adapter_only_checkpoint_resumes_exactly(tmp_path):
    from jaxft.train.loop import train

    ref = train(load_config(lora_run_config(tmp_path, "ref")), base_dir=tmp_path)
    cfg = load_config(lora_run_config(tmp_path, "resumed"))
    first = train(cfg, base_dir=tmp_path, stop_after=3)
    assert first.step == 3
    second = train(cfg, base_dir=tmp_path)
    assert second.step == 6
    got = {**first.losses, **second.losses}
    assert [got[s] for s in range(1, 7)] == [ref.losses[s] for s in range(1, 7)]  # exactly
    # the checkpoint holds the adapter and its optimizer state, not the base
    run = Path(cfg.run_dir)
    model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    full_bytes = 12 * sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))  # params + Adam moments
    step_dir = run / "checkpoints" / "6"
    items = [step_dir / "params", step_dir / "train"]  # no "rest" item: the base is rebuilt from the config
    assert not (step_dir / "rest").exists()
    # Bytes of the arrays the checkpoint stores, from orbax's own metadata (the
    # on-disk data-file sizes vary with write timing, so they are not used).
    import orbax.checkpoint as ocp
    array_bytes = 0
    for item in items:
        stored = ocp.StandardCheckpointer().metadata(item)
        stored = getattr(stored, "item_metadata", stored)
        array_bytes += sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(stored)
                           if hasattr(m, "shape"))
    assert 0 < array_bytes < full_bytes / 10
    tree = "".join((item / "_METADATA").read_text() for item in items)
    assert '"lora"' in tree and '"kernel"' not in tree and '"embedding"' not in tree
    adapter = run / "adapter"
    assert (adapter / "adapter.json").is_file() and (adapter / "adapter.safetensors").is_file()
    assert (adapter / "peft" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- HF PEFT parity

HF_CASES = {
    "llama": ("LlamaForCausalLM", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_peft_export_matches_peft(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from jaxft.interop import load_hf

    arch, extra = HF_CASES[case]
    torch.manual_seed(0)
    cls = getattr(transformers, arch)
    hf_cfg = cls.config_class(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, initializer_range=0.1, **extra)
    cls._from_config(hf_cfg, attn_implementation="eager").eval().save_pretrained(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    cfg = dataclasses.replace(cfg, dtype="float32")
    model = build_model(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=ALL)
    apply_lora(model, lcfg, rngs=nnx.Rngs(1))
    randomize_b(model, std=0.2)
    x = np.random.default_rng(0).integers(3, 96, (2, 12))
    ours = np.asarray(model(jnp.asarray(x, jnp.int32)))
    out = save_adapter(tmp_path / "adapter", model, lcfg, cfg)

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, out / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(x)).logits.float().numpy()
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            hf_base = plain(input_ids=torch.tensor(x)).logits.float().numpy()
    assert np.abs(theirs - hf_base).max() > 1e-2  # the adapter matters
    tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    assert np.abs(ours - theirs).max() <= tol
