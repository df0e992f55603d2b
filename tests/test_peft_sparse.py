"""LT-SFT: exact-K masks with one global threshold, frozen entries bitwise
untouched by training (weight decay on), exact resume across the phase
boundary, sparse diffs on disk, composition arithmetic and the CLI."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxft.cli import main as cli_main
from jaxft.config.schema import MeshConfig, ModelConfig, OptimizerConfig, PeftConfig, SparseConfig, TrainConfig
from jaxft.interop.convert import MODEL_YAML, restore_params, save_params, write_model_yaml
from jaxft.models.registry import build_model
from jaxft.peft import sparse
from jaxft.peft.compose import compose_into, parse_compose_args, parse_spec
from jaxft.sharding import make_mesh, use_mesh
from jaxft.train.optim import make_optimizer
from jaxft.train.state import init_train_state, make_init_fn

TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=32, dtype="float32",
                   max_seq_len=32)


def flat(tree) -> dict[str, np.ndarray]:
    paths, leaves, _ = sparse.flat_with_paths(tree)
    return {p: np.asarray(x) for p, x in zip(paths, leaves)}


def random_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {"enc": {"w": jnp.asarray(rng.normal(size=(8, 6)) * scale, jnp.float32),
                    "b": jnp.asarray(rng.normal(size=(6,)) * scale, jnp.float32)},
            "dec": {"w": jnp.asarray(rng.normal(size=(5, 4, 3)) * scale, jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32)}}


def check_mask(params, theta0, mask, cfg, k, score):
    m, p, p0 = flat(mask), flat(params), flat(theta0)
    kinds = dict(zip(m, sparse.classify(list(m), cfg)))
    assert sum(int(m[q].sum()) for q in m if kinds[q] == "maskable") == k
    for q in m:
        if kinds[q] == "dense":
            assert m[q].all()
        elif kinds[q] == "frozen":
            assert not m[q].any()
    sel = np.concatenate([score(p[q], p0[q])[m[q]] for q in m if kinds[q] == "maskable"])
    uns = np.concatenate([score(p[q], p0[q])[~m[q]] for q in m if kinds[q] == "maskable"])
    if sel.size and uns.size:
        assert sel.min() >= uns.max()  # one global threshold


@pytest.mark.parametrize("k", [1, 17, 0.25, 0.5, 1.0])
def test_lt_mask_selects_exactly_k_over_one_global_threshold(k):
    theta0 = random_tree(0)
    params = jax.tree.map(lambda a, b: a + b, theta0, random_tree(1, 0.1))
    cfg = SparseConfig(k=k, maskable=("enc/", "dec/"), dense=("head",))
    mask = sparse.select_mask(params, theta0, cfg, seed=0)
    n = 8 * 6 + 6 + 60
    want = int(k) if k >= 1 else round(k * n)
    check_mask(params, theta0, mask, cfg, want, lambda a, b: np.abs(a - b))


def test_ties_resolved_to_exactly_k_in_flat_index_order():
    theta0 = jax.tree.map(jnp.zeros_like, random_tree(0))
    params = jax.tree.map(lambda x: x + 0.5, theta0)  # every delta equal
    cfg = SparseConfig(k=0.3, maskable=(".*",))
    mask = flat(sparse.select_mask(params, theta0, cfg, seed=0))
    total = sum(m.size for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.3 * total)
    # deterministic tie-break: tensors in tree order, then row-major flat index
    selected = np.concatenate([m.ravel() for m in mask.values()])
    assert selected[:round(0.3 * total)].all() and not selected[round(0.3 * total):].any()
    # some ties above a strict winner: the winner is always kept
    params["dec"]["w"] = params["dec"]["w"].at[4, 3, 2].set(2.0)
    mask = flat(sparse.select_mask(params, theta0, SparseConfig(k=3), seed=0))
    assert mask["dec/w"][4, 3, 2] and sum(int(m.sum()) for m in mask.values()) == 3


@pytest.mark.parametrize("mask_type", ["magnitude", "random"])
def test_baselines_select_k(mask_type):
    theta0, params = random_tree(0), random_tree(1)
    cfg = SparseConfig(k=0.1, mask_type=mask_type, maskable=("enc/", "dec/"), dense=("head",))
    mask = sparse.select_mask(params, theta0, cfg, seed=3)
    k = round(0.1 * (48 + 6 + 60))
    if mask_type == "magnitude":
        check_mask(params, theta0, mask, cfg, k, lambda a, b: np.abs(a))
    else:
        check_mask(params, theta0, mask, cfg, k, lambda a, b: np.zeros_like(a))
        again = sparse.select_mask(params, theta0, cfg, seed=3)
        other = sparse.select_mask(params, theta0, cfg, seed=4)
        assert all((flat(mask)[q] == flat(again)[q]).all() for q in flat(mask))
        assert any((flat(mask)[q] != flat(other)[q]).any() for q in flat(mask))


def test_k_errors_name_the_key():
    t = random_tree(0)
    with pytest.raises(ValueError, match="peft.sparse.k"):
        sparse.select_mask(t, t, SparseConfig(k=10_000), seed=0)


def test_mask_on_a_sharded_mesh_keeps_shardings_and_variable_types():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    init_fn, _ = make_init_fn(TINY, TrainConfig(), make_optimizer(OptimizerConfig(), 10), seed=0,
                              peft_cfg=PeftConfig(method="sparse"))
    with use_mesh(mesh):
        state, shardings = init_train_state(init_fn, mesh)
        theta0 = state.params
        noise = jax.jit(lambda p: jax.tree.map(
            lambda x: x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), p),
            out_shardings=shardings.params)
        params = noise(theta0)
        cfg = SparseConfig(k=0.02, maskable=("layers/",), dense=("lm_head",))
        mask = sparse.select_mask(params, theta0, cfg, seed=0)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        for (_, v), (_, m) in zip(nnx.to_flat_state(params), nnx.to_flat_state(mask)):
            assert type(v) is type(m) and m.get_value().dtype == jnp.bool_
            assert m.get_value().sharding.is_equivalent_to(v.get_value().sharding, v.get_value().ndim)
        mask = jax.device_put(mask, shardings.mask)  # what the trainer does
    n = sum(x.size for p, x in flat(params).items() if p.startswith("layers/"))
    check_mask(params, theta0, mask, cfg, round(0.02 * n), lambda a, b: np.abs(a - b))


# --------------------------------------------------------------------------- diffs and composition


def dyadic_tree(seed: int) -> dict:
    """float32 values on a coarse dyadic grid: sums and differences are exact."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.integers(-64, 64, size=x.shape) / 16, jnp.float32),
                        random_tree(0))


def test_save_load_apply_revert(tmp_path):
    theta0, theta = dyadic_tree(0), dyadic_tree(1)
    cfg = SparseConfig(k=20, maskable=("enc/", "dec/"), dense=("head",))
    mask = sparse.select_mask(theta, theta0, cfg, seed=0)
    out = sparse.save_diff(tmp_path / "d", theta, theta0, mask, cfg)
    meta = json.loads((out / "diff.json").read_text())
    assert meta["count"] == meta["k"] == 20 and meta["mask_type"] == "lt" and meta["dense"] == ["head/kernel"]
    diff = sparse.load_diff(out)
    assert diff.count == 20 and diff.tensors["head/kernel"].dense
    for t in diff.tensors.values():
        assert t.dense or t.indices.dtype == np.int32
    applied = flat(sparse.apply_diff(theta0, diff))
    m, th, t0 = flat(mask), flat(theta), flat(theta0)
    for q in th:  # theta0 + diff = theta on the mask, theta0 elsewhere
        np.testing.assert_array_equal(applied[q], np.where(m[q], th[q], t0[q]))
    back = flat(sparse.revert_diff(sparse.apply_diff(theta0, diff, 0.5), diff, 0.5))
    for q in t0:  # exact: dyadic float32 values
        np.testing.assert_array_equal(back[q], t0[q])
    with pytest.raises(ValueError, match="shape"):
        sparse.apply_diff({"enc": {"w": jnp.zeros((2, 2))}, "dec": {"w": jnp.zeros((5, 4, 3))},
                           "head": {"kernel": jnp.zeros((4, 3))}}, diff)


def make_base_dir(tmp: Path, name: str, seed: int) -> tuple[Path, nnx.State]:
    """A jaxft checkpoint folder (the layout `jaxft convert hf-to-jaxft` writes)."""
    model = build_model(TINY, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    params = jax.tree.map(lambda x: jnp.round(x * 1024) / 1024, params)  # dyadic: exact arithmetic
    d = tmp / name
    d.mkdir()
    save_params(d / "params", params)
    write_model_yaml(d / MODEL_YAML, TINY)
    return d, params


def perturbed(params, seed: int, frac: float):
    def f(x):
        key = jax.random.fold_in(jax.random.key(seed), x.size)
        hit = jax.random.uniform(key, x.shape) < frac
        return jnp.where(hit, x + jnp.round(jax.random.normal(key, x.shape) * 64) / 1024, x)

    return jax.tree.map(f, params)


def test_compose_language_and_task_diffs(tmp_path):
    theta0 = nnx.state(build_model(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    theta0 = jax.tree.map(lambda x: jnp.round(x * 1024) / 1024, theta0)
    cfg = SparseConfig(k=0.05)
    lang, task = perturbed(theta0, 1, 0.1), perturbed(theta0, 2, 0.1)
    d_lang = sparse.save_diff(tmp_path / "lang", lang, theta0,
                              sparse.select_mask(lang, theta0, cfg, seed=0), cfg)
    d_task = sparse.save_diff(tmp_path / "task", task, theta0,
                              sparse.select_mask(task, theta0, cfg, seed=0), cfg)
    model = build_model(TINY, rngs=nnx.Rngs(0))
    nnx.update(model, theta0)
    compose_into(model, [str(d_lang), f"{d_task} * 0.5"])
    got = flat(nnx.state(model, nnx.Param))
    want = flat(sparse.apply_diff(sparse.apply_diff(theta0, sparse.load_diff(d_lang)),
                                  sparse.load_diff(d_task), 0.5))
    for q in want:
        np.testing.assert_array_equal(got[q], want[q])
    compose_into(model, [f"{d_task}*-0.5", f"{d_lang}*-1"])  # revert: bitwise identity (dyadic values)
    for q, x in flat(nnx.state(model, nnx.Param)).items():
        np.testing.assert_array_equal(x, flat(theta0)[q])
    with pytest.raises(FileNotFoundError, match=r"peft.compose\[1\]: .*nope"):
        compose_into(model, [str(d_lang), str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"peft.compose\[0\]: .*empty"):
        compose_into(model, [str(tmp_path / "empty")])


def test_parse_specs():
    assert parse_spec("a/b") == ("a/b", 1.0)
    assert parse_spec("a/b*0.5") == ("a/b", 0.5) and parse_spec("a/b * -2") == ("a/b", -2.0)
    assert parse_compose_args(["base", "+", "d1", "*", "0.5", "+", "d2*2"], ["d3"]) == \
        ("base", ["d1*0.5", "d2*2", "d3"])
    with pytest.raises(ValueError, match="expected '\\+'"):
        parse_compose_args(["base", "d1"], [])


def test_cli_diff_and_compose_round_trip(tmp_path):
    base_dir, base = make_base_dir(tmp_path, "base", 0)
    ft = perturbed(base, 5, 0.2)
    ft_dir = tmp_path / "ft"
    ft_dir.mkdir()
    save_params(ft_dir / "params", ft)
    write_model_yaml(ft_dir / MODEL_YAML, TINY)
    other_dir, other = make_base_dir(tmp_path, "other", 1)

    # dense diff vector: base + diff == finetuned; other base + 0.5 * diff
    assert cli_main(["diff", str(ft_dir), str(base_dir), "--out", str(tmp_path / "delta")]) == 0
    assert cli_main(["compose", str(base_dir), "+", str(tmp_path / "delta"), "--out", str(tmp_path / "c1")]) == 0
    got = flat(restore_params(tmp_path / "c1" / "params", TINY))
    for q, x in flat(ft).items():
        np.testing.assert_allclose(got[q], x, atol=1e-6)
    assert cli_main(["compose", str(other_dir), "+", str(tmp_path / "delta"), "*", "0.5",
                     "--out", str(tmp_path / "c2")]) == 0
    got = flat(restore_params(tmp_path / "c2" / "params", TINY))
    for q, x in flat(other).items():
        np.testing.assert_allclose(got[q], x + 0.5 * (flat(ft)[q] - flat(base)[q]), atol=1e-6)
    assert (tmp_path / "c2" / MODEL_YAML).is_file()

    # sparse diff: exactly K stored, the K largest |delta|; --revert undoes --add
    assert cli_main(["diff", str(ft_dir), str(base_dir), "--out", str(tmp_path / "sd"), "--sparse-k", "50"]) == 0
    assert sparse.load_diff(tmp_path / "sd").count == 50
    assert cli_main(["compose", str(ft_dir), "--add", f"{tmp_path / 'sd'}*1", "--out", str(tmp_path / "c3")]) == 0
    assert cli_main(["compose", str(tmp_path / "c3"), "--add", str(tmp_path / "sd"), "--revert",
                     "--out", str(tmp_path / "c4")]) == 0
    got = flat(restore_params(tmp_path / "c4" / "params", TINY))
    for q, x in flat(ft).items():
        np.testing.assert_array_equal(got[q], x)
    assert cli_main(["compose", str(base_dir), "+", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- end to end


def sparse_run_config(tmp: Path, name: str) -> Path:
    from trainutil import write_run_config

    path = write_run_config(tmp, steps=6, name=name, extra={"optimizer.weight_decay": 0.1})
    cfg = yaml.safe_load(path.read_text())
    cfg["peft"] = {"method": "sparse", "sparse": {"phase1_steps": 3, "k": 0.01}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sparse_reference(tmp_path_factory):
    from jaxft.config.loader import load_config
    from jaxft.train.loop import train

    tmp = tmp_path_factory.mktemp("sft")
    cfg = load_config(sparse_run_config(tmp, "ref"))
    result = train(cfg, base_dir=tmp)
    return tmp, cfg, result


def final_state_and_theta0(cfg):
    """(final checkpointed params and mask, theta0 params), restored / rebuilt the way the trainer does."""
    from types import SimpleNamespace

    from jaxft.peft.methods import method_for
    from jaxft.runs.checkpoint import Checkpointer
    from jaxft.runs.model import init_variables, start_from
    from jaxft.train.state import make_init_fn, sharded_abstract

    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    init_fn, _ = make_init_fn(cfg.model, cfg.train, tx, cfg.train.seed, cfg.peft)
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh):
        abstract, _ = sharded_abstract(init_fn, mesh)
        ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint, read_only=True)
        step, items = ckpt.restore_latest({"params": abstract.params, "train": {
            "step": abstract.step, "opt_state": abstract.opt_state, "mask": abstract.mask}})
        ckpt.close()
        method = method_for(cfg.peft, cfg.train, cfg.model)
        graphdef, params0, rest0 = init_variables(cfg, method, mesh)
        model = nnx.merge(graphdef, params0, rest0)
        start_from(model, cfg, mesh)
        theta0 = nnx.split(model, method.trainable_filter(), ...)[1]
    assert step == cfg.train.steps
    return SimpleNamespace(params=items["params"], mask=items["train"]["mask"]), theta0


def test_lt_sft_run_freezes_unselected_entries_bitwise(sparse_reference):
    """Weight decay 0.1 on: after the run, params == theta0 exactly off the mask, the K
    masked entries moved, and sparse_diff/ holds exactly those K entries."""
    _, cfg, result = sparse_reference
    state, theta0 = final_state_and_theta0(cfg)
    params, mask, theta0 = flat(state.params), flat(state.mask), flat(theta0)
    total = sum(x.size for x in params.values())
    k = round(0.01 * total)
    assert sum(int(m.sum()) for m in mask.values()) == k
    moved = 0
    for q in params:
        np.testing.assert_array_equal(params[q][~mask[q]], theta0[q][~mask[q]])
        moved += int((params[q][mask[q]] != theta0[q][mask[q]]).sum())
    assert moved > 0.9 * k
    diff = sparse.load_diff(result.run_dir / "sparse_diff")
    assert diff.count == k and not any(t.dense for t in diff.tensors.values())
    meta = json.loads((result.run_dir / "sparse_diff" / "diff.json").read_text())
    assert meta["count"] == k and meta["mask_type"] == "lt"
    for q, t in diff.tensors.items():
        assert mask[q].ravel()[t.indices].all() and t.values.dtype == np.float32
    rebuilt = flat(sparse.apply_diff({q: jnp.asarray(x) for q, x in theta0.items()}, diff))
    for q in params:
        np.testing.assert_allclose(rebuilt[q], params[q], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stop_after", [2, 4])
def test_lt_sft_exact_resume_across_phase_boundary(sparse_reference, stop_after):
    from jaxft.config.loader import load_config
    from jaxft.train.loop import train

    tmp, _, ref = sparse_reference
    cfg = load_config(sparse_run_config(tmp, f"resumed{stop_after}"))
    first = train(cfg, base_dir=tmp, stop_after=stop_after)
    second = train(cfg, base_dir=tmp)
    losses = {**first.losses, **second.losses}
    assert [losses[s] for s in range(1, 7)] == [ref.losses[s] for s in range(1, 7)]
    a = sparse.load_diff(ref.run_dir / "sparse_diff")
    b = sparse.load_diff(second.run_dir / "sparse_diff")
    for q, t in a.tensors.items():
        np.testing.assert_array_equal(t.indices, b.tensors[q].indices)
        np.testing.assert_array_equal(t.values, b.tensors[q].values)


def test_compose_lora_adapter_and_sparse_diff(tmp_path):
    lora = pytest.importorskip("jaxft.peft.lora")
    if not hasattr(lora, "merge_adapter_dir_into"):
        pytest.skip("jaxft.peft.lora.merge_adapter_dir_into is not there yet")
    from jaxft.config.schema import LoraConfig

    lcfg = LoraConfig(rank=2)
    trained = lora.apply_lora(build_model(TINY, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(1))
    for _, _, _, ad in lora.adapters(trained):
        ad.b.set_value(jnp.full(ad.b.get_value().shape, 0.01, ad.b.get_value().dtype))
    adapter = lora.save_adapter(tmp_path / "adapter", trained, lcfg, TINY)
    want = flat(nnx.state(lora.merge_lora(trained, drop=True), nnx.Param))

    theta0 = nnx.state(build_model(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    cfg = SparseConfig(k=0.05)
    task = perturbed(theta0, 2, 0.1)
    d_task = sparse.save_diff(tmp_path / "task", task, theta0, sparse.select_mask(task, theta0, cfg, seed=0), cfg)
    model = compose_into(build_model(TINY, rngs=nnx.Rngs(0)), [f"{adapter}*0.5", f"{adapter}*0.5", str(d_task)])
    got = flat(nnx.state(model, nnx.Param))
    delta = flat(sparse.apply_diff(jax.tree.map(jnp.zeros_like, theta0), sparse.load_diff(d_task)))
    assert set(got) == set(want)  # no adapter stays
    for q in want:
        np.testing.assert_allclose(got[q], want[q] + delta[q], atol=1e-6)
