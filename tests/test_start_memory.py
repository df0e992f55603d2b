"""Start-up memory of a run that starts from a checkpoint (`model.init_from`): the random state is
built without optimizer state, a stacked (`model.scan_layers`) state is unstacked and restacked
array by array, and the optimizer state is made once from the loaded values.  Measured with
`jax.live_arrays()` at the points where earlier code held two or three copies of the parameters:
when the checkpoint starts loading (then: parameters + AdamW moments) and while the layers are
restacked (then: every stack twice)."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
from flax import nnx

import jaxft.models.stacking as stacking
import jaxft.train.setup as setup_mod
from jaxft.config.loader import load_config
from jaxft.interop.hf import init_params_from
from jaxft.models.scan import STACKED, stack_layers, stack_owned, unstack_layers
from trainutil import save_tiny_hf_llama, write_run_config

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "stacked"])
def test_starting_from_a_checkpoint_holds_one_copy_of_the_parameters(tmp_path, monkeypatch, scan):
    hf_dir = save_tiny_hf_llama(tmp_path / "hf", layers=3)
    path = write_run_config(tmp_path, steps=2, extra={"model.n_layers": 3, "model.scan_layers": scan,
                                                      "model.init_from": f"hf:{hf_dir}"})
    cfg = load_config(path, ["model.max_seq_len=128", "model.norm_eps=1e-6"])

    seen: dict[str, list[int]] = {"load": [], "stack": []}
    real_start, real_stack = setup_mod.start_from, stacking._stack_deleting

    def start_from(model, *a, **k):
        seen["load"].append(live_bytes() - base)
        return real_start(model, *a, **k)

    def stack_deleting(values):
        out = real_stack(values)
        seen["stack"].append(live_bytes() - base)
        return out

    monkeypatch.setattr(setup_mod, "start_from", start_from)
    monkeypatch.setattr(stacking, "_stack_deleting", stack_deleting)
    gc.collect()
    base = live_bytes()
    run = setup_mod.setup(cfg, base_dir=tmp_path)
    state = run.state
    params_bytes = tree_bytes(state.params) + tree_bytes(state.rest)
    assert tree_bytes(state.opt_state) > params_bytes  # AdamW: two moments per parameter

    # when loading starts: the random parameters only (no optimizer state, one copy)
    assert len(seen["load"]) == 1 and seen["load"][0] <= 1.1 * params_bytes, (seen["load"], params_bytes)
    if scan:
        # restacking: the parameters plus the one stacked array being built, never two copies
        largest = max(x.nbytes for x in jax.tree.leaves(state.params))
        assert len(seen["stack"]) >= 9  # every stacked kind of array, one at a time
        assert max(seen["stack"]) <= params_bytes + largest + 0.1 * params_bytes, (seen["stack"], params_bytes)
        assert any(s == STACKED for s in state.params["layers"].keys())
    else:
        assert seen["stack"] == []

    # the values are the checkpoint's, on the train state's shardings
    loaded = nnx.to_flat_state(init_params_from(cfg.model.init_from, cfg.model, None))
    got = dict(nnx.to_flat_state(unstack_layers(state.params)))
    assert set(got) == {p for p, _ in loaded}
    for p, v in loaded:
        np.testing.assert_array_equal(np.asarray(got[p].get_value()), np.asarray(v.get_value()), err_msg=str(p))
    for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(run.shardings.params), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    run.ckpt.close()


def test_stack_owned_stacks_as_stack_layers_and_frees_the_layers():
    from jaxft.models import build_model
    from test_dropout import preset

    _, params, rest = nnx.split(build_model(preset("tiny-llama", n_layers=3), rngs=nnx.Rngs(0)), nnx.Param, ...)
    want = jax.tree.map(np.asarray, stack_layers(params, rest))
    layer_arrays = jax.tree.leaves(params["layers"])
    got = stack_owned(params, rest)
    assert all(x.is_deleted() for x in layer_arrays) and len(layer_arrays) >= 27
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # the sharding metadata gains the (replicated) layer axis as `stack_layers` gives it
    meta = lambda t: [v.get_metadata().get("out_sharding") for v in jax.tree.leaves(t, is_leaf=lambda v: isinstance(v, nnx.Variable))]  # noqa: E731
    assert meta(got) == meta(stack_layers(*nnx.split(build_model(preset("tiny-llama", n_layers=3), rngs=nnx.Rngs(0)),
                                                      nnx.Param, ...)[1:]))
