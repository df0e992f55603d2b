"""`jaxft plan`: the real train step compiled for an abstract TPU slice (libtpu, no TPU), per-chip
memory from the compiled executable, FITS / DOES NOT FIT, fixes re-planned; multi-slice meshes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxft.config.loader import load_config
from jaxft.config.schema import MeshConfig
from jaxft.models.flops import param_count
from jaxft.sharding import MeshError, check_batch, make_mesh
from jaxft.train import plan as plan_lib
from jaxft.train.chips import CHIPS, TopologyError, parse_topology

TINY = textwrap.dedent("""\
    run_dir: run
    model: {preset: tiny-llama, vocab_size: 2048, d_model: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2,
            mlp_dim: 384, max_seq_len: 128}
    data: {seq_len: 128}
    train: {global_batch: 8, steps: 10}
""")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_slice_names_become_libtpu_topologies():
    assert parse_topology("v5p-256").name == "v5p:4x4x8"  # 128 chips (v5p names count 2 cores per chip)
    assert parse_topology("v4-128").name == "v4:4x4x4"
    assert parse_topology("v4-8").name == "v4:2x2x1"
    assert parse_topology("v5litepod-16").name == "v5e:4x4"
    assert parse_topology("v5e-256").name == "v5e:16x16"
    assert parse_topology("v6e-8").name == "v6e:2x4"
    t = parse_topology("v5p:2x2x4", num_slices=2)
    assert (t.n_chips, t.chips_per_slice, t.describe()) == (32, 16, "2 x v5p-32 (v5p:2x2x4, 16 chips)")
    for bad in ("v7x-8", "v5p-12", "v5e:2x2x2", "tpu"):
        with pytest.raises(TopologyError, match="--topology"):
            parse_topology(bad)


def test_collective_bytes_counts_loop_trips():
    hlo = textwrap.dedent("""\
        %body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ar = f32[1024,4]{1,0} all-reduce(f32[1024,4]{1,0} %x), channel_id=1, to_apply=%add
          %ag = (f32[64]{0}, bf16[256,8]{1,0}) all-gather-start(f32[64]{0} %y), channel_id=2
          %agd = bf16[256,8]{1,0} all-gather-done((f32[64]{0}, bf16[256,8]{1,0}) %ag)
        }
        ENTRY %main.9 (a: f32[8]) -> f32[8] {
          %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"4"}}
          %rs = f32[16]{0} reduce-scatter(f32[128]{0} %z), channel_id=3, dimensions={0}
        }
    """)
    assert plan_lib.collective_bytes(hlo) == {"all-reduce": 4 * 1024 * 4 * 4, "all-gather": 4 * 256 * 8 * 2,
                                              "reduce-scatter": 16 * 4}


def test_collective_bytes_counts_an_async_collective_fusion_once():
    """The TPU compiler's async collective fusions repeat one all-gather (one channel_id) in the
    start, each continuation and the done computation: one gather of the weight, not four."""
    hlo = textwrap.dedent("""\
        %fused_computation.1 (p0: bf16[512,14336]) -> (bf16[512,14336], bf16[4096,14336]) {
          %all-gather.1 = bf16[4096,14336]{1,0} all-gather(bf16[512,14336]{1,0} %p0), channel_id=51, dimensions={0}
        }
        %async_collective_fusion.2 (p0: bf16[512,14336], p1: bf16[4096,14336]) -> bf16[2,1024,16] {
          %all-gather.2 = bf16[4096,14336]{1,0} all-gather(bf16[512,14336]{1,0} %p0), channel_id=51, dimensions={0}
        }
        %async_collective_fusion.3 (p0: bf16[512,14336], p1: bf16[4096,14336]) -> bf16[2,1024,16] {
          %all-gather.3 = bf16[4096,14336]{1,0} all-gather(bf16[512,14336]{1,0} %p0), channel_id=51, dimensions={0}
        }
        %fused_computation.4 (p0: bf16[512,14336]) -> bf16[4096,14336] {
          %all-gather.4 = bf16[4096,14336]{1,0} all-gather(bf16[512,14336]{1,0} %p0), channel_id=51, dimensions={0}
          %all-reduce.5 = f32[16]{0} all-reduce(f32[16]{0} %q), channel_id=52, to_apply=%add
        }
        ENTRY %main.9 (a: bf16[512,14336]) -> bf16[4096,14336] {
          %start = (bf16[512,14336], bf16[4096,14336]) fusion(%a), kind=kCustom, calls=%fused_computation.1
          %f2 = bf16[2,1024,16] fusion(%start), kind=kCustom, calls=%async_collective_fusion.2
          %f3 = bf16[2,1024,16] fusion(%start), kind=kCustom, calls=%async_collective_fusion.3
          ROOT %done = bf16[4096,14336] fusion(%start), kind=kCustom, calls=%fused_computation.4
          %ar = f32[16]{0} all-reduce(f32[16]{0} %r), to_apply=%add
          %ar2 = f32[16]{0} all-reduce(f32[16]{0} %r), to_apply=%add
        }
    """)
    # channel-less collectives (the CPU's) count per instruction
    assert plan_lib.collective_bytes(hlo) == {"all-gather": 4096 * 14336 * 2, "all-reduce": 3 * 16 * 4}


def test_collective_bytes_counts_a_reduce_scatter_by_the_array_each_chip_sends():
    """A reduce-scatter moves its whole input through each chip (not the slice it keeps); the
    TPU compiler writes one as an all-reduce + dynamic slice in an all-reduce-scatter fusion,
    which is a reduce-scatter's bytes, not an all-reduce's (counted twice over ICI)."""
    hlo = textwrap.dedent("""\
        %all-reduce-scatter.10 (input_0.1: f32[2048,128]) -> f32[2048,16] {
          %all-reduce.60 = (f32[2048,128]{0,1:T(8,128)}) all-reduce(%input_0.1), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
          ROOT %dynamic-slice.302 = f32[2048,16]{0,1} dynamic-slice(%get-tuple-element.2549, %c, %m), dynamic_slice_sizes={2048,16}
        }
        ENTRY %main.9 (a: f32[2048,128]) -> f32[2048,16] {
          %fusion.291 = f32[2048,16]{0,1} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.10
          %rs = f32[16]{0} reduce-scatter(f32[128]{0} %z), channel_id=3, replica_groups=[2,8]<=[16], dimensions={0}
          %ar = f32[64]{0} all-reduce(f32[64]{0} %z), channel_id=4, replica_groups={{0,1},{2,3}}, to_apply=%add
          %rs2 = bf16[8]{0} reduce-scatter(%z), channel_id=5, replica_groups=mesh['axis_0'=8,'axis_1'=4] {'axis_0','axis_1'}, dimensions={0}
        }
    """)
    assert plan_lib.collective_bytes(hlo) == {"reduce-scatter": 2048 * 128 * 4 + 16 * 8 * 4 + 8 * 32 * 2,
                                              "all-reduce": 64 * 4}


def test_collective_bytes_reads_a_scan_trip_count_from_the_loop_condition():
    """The TPU compiler drops `known_trip_count`; a `lax.scan` loop's condition still says
    `counter < 32`."""
    hlo = textwrap.dedent("""\
        %cond.7 (p: (s32[], f32[8])) -> pred[] {
          %c = s32[]{:T(128)} constant(32)
          %i = s32[]{:T(128)} get-tuple-element((s32[], f32[8]) %p), index=0
          ROOT %lt = pred[]{:T(512)} compare(s32[] %i, s32[] %c), direction=LT
        }
        %body.7 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
          %ag = bf16[256,8]{1,0} all-gather(bf16[64,8]{1,0} %y), channel_id=2, dimensions={0}
        }
        ENTRY %main.9 (a: f32[8]) -> f32[8] {
          %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond.7, body=%body.7
          %w2 = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%unknown, body=%body.7
        }
    """)
    assert plan_lib.collective_bytes(hlo) == {"all-gather": 32 * 256 * 8 * 2}  # max over the two callers


def test_multi_slice_mesh_puts_dcn_outermost():
    devices = jax.devices()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # the first half of data rows is slice 0 (devices 0-3), the second half slice 1 (devices 4-7)
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, dcn_fsdp=2), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(MeshError, match="dcn_data x mesh.dcn_fsdp = 3"):
        make_mesh(MeshConfig(dcn_data=3), devices)
    with pytest.raises(MeshError, match="rows per microbatch must be divisible by the 8 data-parallel devices"):
        check_batch(12, 1, make_mesh(MeshConfig(data=2, fsdp=2, dcn_data=2), devices))


def test_plan_on_local_devices_has_no_verdict_without_a_capacity(tiny):
    cfg = load_config(tiny)
    p = plan_lib.plan(lambda o: load_config(tiny, o), [], jax.devices(), target="cpu", peak=1e11)
    assert p.fits is None and p.suggestions == [] and p.n_chips == 8
    assert p.memory["params"] == 4 * param_count(cfg.model)  # mesh data=8: replicated fp32 parameters
    assert p.flops["compiled"] > 0 and p.estimate["step_s"] > 0


libtpu = pytest.importorskip("libtpu", reason="libtpu (the test extra) plans TPU slices")


def _compiles(monkeypatch) -> list:
    """Every executable plan_once compiles, to compare its report with the executable's own stats."""
    seen = []
    real = plan_lib.lower_step_parts

    def spy(cfg, devices):
        parts = real(cfg, devices)
        lowered = parts.lowered

        class Lowered:
            def compile(self):
                seen.append(lowered.compile())
                return seen[-1]
        parts.lowered = Lowered()
        return parts
    monkeypatch.setattr(plan_lib, "lower_step_parts", spy)
    return seen


def test_a_refused_scanned_step_stops_its_extrapolation_workers(tiny):
    """`model.scan_layers` on a slice: the small unrolled compiles run in worker processes beside the
    scanned step's; when the compiler refuses the step they are stopped (not waited for), and a
    fitting step gets their extrapolated FLOPs."""
    import multiprocessing
    import threading

    from jaxft.train.chips import abstract_devices, topology_target

    topology = parse_topology("v5e-4")
    run = lambda batch: plan_lib.plan(lambda o: load_config(tiny, o), [f"train.global_batch={batch}",  # noqa: E731
                                      "model.scan_layers=true", "model.n_layers=3"], abstract_devices(topology),
                                      suggest=False, **topology_target(topology))
    threads = threading.active_count()
    refused = run(65536)
    assert refused.fits is False and "exceeds available HBM" in refused.compiler_error
    assert not refused.planning["cost_extrapolated"] and multiprocessing.active_children() == []
    assert threading.active_count() == threads  # nothing left compiling behind the answer
    fits = run(8)
    assert fits.fits is True and fits.planning["cost_extrapolated"] and fits.flops["compiled"] > 0
    assert multiprocessing.active_children() == []


def test_v5e_plan_does_not_fit_and_a_replanned_fix_does(tiny, monkeypatch):
    """A batch that needs ~26 GiB per v5e chip: DOES NOT FIT by the compiler's own figures; full
    remat alone still does not fit (~17 GiB), two microbatches do (~14.5 GiB; each re-planned).
    (65536 rows until RoPE's tables were shared by the layers: full remat then needed 15.9 GiB,
    now 14.9, and fits.)"""
    from jaxft.train.chips import abstract_devices, topology_target

    topology = parse_topology("v5e-4")
    compiled = _compiles(monkeypatch)
    p = plan_lib.plan(lambda o: load_config(tiny, o), ["train.global_batch=70000"], abstract_devices(topology),
                      max_suggestions=2, **topology_target(topology))
    assert p.fits is False and p.capacity == int(15.75 * 2**30) == CHIPS["v5e"].usable_hbm
    assert "exceeds available HBM" in p.compiler_error and p.memory["temporaries"] > p.capacity
    assert p.total - p.capacity > 2 * 2**30 and not p.estimate  # no executable: nothing to time
    assert [s.overrides for s in p.suggestions] == [("model.remat=full",), ("train.microbatches=2",)]
    remat, micro = p.suggestions
    assert remat.fits is False and micro.fits is True
    # the fitting plan's numbers are the executable's: arguments split by the inputs' shardings
    stats = compiled[-1].memory_analysis()
    assert micro.memory["temporaries"] == stats.temp_size_in_bytes
    assert micro.memory["code"] == stats.generated_code_size_in_bytes
    args = micro.memory["params"] + micro.memory["optimizer"] + micro.memory["other_inputs"]
    assert args == stats.argument_size_in_bytes
    n_params = param_count(load_config(tiny).model)
    assert micro.memory["params"] == 4 * n_params  # mesh data=4: replicated fp32 parameters
    assert micro.memory["optimizer"] >= 2 * 4 * n_params  # AdamW's two moments
    assert micro.total <= micro.capacity and micro.flops["compiled"] > 0
    assert micro.collectives.get("all-reduce", 0) >= 4 * n_params  # the gradient all-reduce
    e = micro.estimate
    assert e["step_s"] == max(e["compute_s"], e["hbm_s"], e["ici_s"] + e["dcn_s"]) > 0
    assert 0 < e["mfu"] <= 1 and e["tokens_per_s"] == pytest.approx(70000 * 128 / e["step_s"])


def test_plan_cli_json_and_exit_status(tiny, capsys):
    from jaxft.cli import main

    status = main(["plan", str(tiny), "--topology", "v5e-4", "--json", "--no-suggest",
                   "--set", "train.global_batch=65536"])
    out = json.loads(capsys.readouterr().out)
    assert status == 1 and out["fits"] is False and out["target"].startswith("v5e-4 (v5e:2x2")
    assert main(["plan", str(tiny), "--topology", "v9-8"]) == 2
    assert "--topology: 'v9-8' is not a TPU slice" in capsys.readouterr().err


def test_extrapolation_starts_from_a_layer_a_model_can_lose(tiny):
    """Decoder-only steps extrapolate from 0 and 1 layers; LoRA (a layerless model has no kernel
    to adapt) and encoder-decoders (`n_decoder_layers: 0` means "as deep as the encoder") from 1
    per stack, with one group per stack depth."""
    jobs = plan_lib._extrapolation_jobs
    assert jobs(load_config(tiny, ["model.n_layers=4"])) == ({"n_layers": 0}, [(4, {"n_layers": 1})])
    assert jobs(load_config(tiny, ["model.n_layers=4", "peft.method=lora"])) == (
        {"n_layers": 1}, [(3, {"n_layers": 2})])


TINY_T5 = textwrap.dedent("""\
    run_dir: run
    model: {preset: tiny-t5, vocab_size: 2048, d_model: 128, n_heads: 4, mlp_dim: 384}
    data: {seq_len: 64, encoder_seq_len: 96}
    train: {global_batch: 8, steps: 10}
""")


@pytest.mark.parametrize("family,layers", [("llama", ["model.n_layers=4"]),
                                           ("t5", ["model.n_layers=3", "model.n_decoder_layers=2"])])
def test_a_scanned_plan_reports_the_unrolled_step_s_flops_and_collectives(tiny, tmp_path, family, layers):
    """`model.scan_layers`: the cost analysis counts the scan body once; the plan adds the other
    layers from small unrolled compiles (per stack of its own depth: T5 3 + 2) and counts
    collectives per layer from the loop condition, so it reports what the unrolled fsdp step
    compiles to."""
    from jaxft.train.chips import abstract_devices, topology_target

    config = tiny
    if family == "t5":
        config = tmp_path / "t5.yaml"
        config.write_text(TINY_T5)
    topology = parse_topology("v5e-8")
    plans = [plan_lib.plan(lambda o: load_config(config, o), [*layers, "mesh.data=1", "mesh.fsdp=-1",
                                                            f"model.scan_layers={scan}"],
                           abstract_devices(topology), **topology_target(topology)) for scan in (False, True)]
    unrolled, scanned = plans
    assert scanned.planning["cost_extrapolated"] and not unrolled.planning["cost_extrapolated"]
    assert scanned.flops["compiled"] == pytest.approx(unrolled.flops["compiled"], rel=1e-3)
    assert scanned.flops["compiled"] >= scanned.flops["model"]  # not one layer's worth
    assert scanned.estimate["hbm_s"] == pytest.approx(unrolled.estimate["hbm_s"], rel=0.25)  # bytes accessed
    # the gradients' reduce-scatters (the TPU's all-reduce-scatter fusions), the same bytes
    assert scanned.collectives["reduce-scatter"] == pytest.approx(unrolled.collectives["reduce-scatter"], rel=1e-4)
    assert unrolled.collectives["reduce-scatter"] > 10 * unrolled.collectives.get("all-reduce", 0)
    # per-layer FSDP all-gathers, counted per layer (once they would read as a quarter); the two
    # programs schedule their gathers differently (4.5 vs 4.2 MiB for this llama)
    assert 0.75 < scanned.collectives["all-gather"] / unrolled.collectives["all-gather"] < 1.25
    assert scanned.estimate["mfu"] == pytest.approx(unrolled.estimate["mfu"], rel=0.2)


def test_planning_workers_start_from_a_script_without_a_main_guard(tmp_path):
    """The extrapolation's worker processes are spawned; they must not re-run the caller's script
    (a script calling `plan` with no ``if __name__ == "__main__":`` guard made every worker plan
    again, fail in its bootstrap and be replaced forever: the planner hung)."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from jaxft.train.plan_workers import Workers\n"
                      "print('top level ran')\n"
                      "w = Workers(topology='any')\n"
                      "print('result', w.submit(None, slice, 'cfg', None, {})())\n"
                      "w.stop(True)\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["top level ran", "result slice('cfg', 'any', {})"]


def test_gpu_plans_try_the_remat_that_adds_no_products_first(tiny):
    """`model.remat=dots_attention` (17% fewer temporaries on an H200, no second attention forward)
    is a GPU plan's first fix, ahead of full remat; TPU plans (no gain there) never try it."""
    cfg = load_config(tiny)
    gpu, tpu = plan_lib.fix_candidates(cfg, n_dp=4, gpu=True), plan_lib.fix_candidates(cfg, n_dp=4)
    assert gpu[:2] == [("model.remat=dots_attention",), ("model.remat=full",)] and gpu[1:] == tpu
    assert not any("dots_attention" in o for fix in tpu for o in fix)
    done = load_config(tiny, ["model.remat=dots_attention"])
    assert plan_lib.fix_candidates(done, n_dp=4, gpu=True)[0] == ("model.remat=full",)


def test_large_logits_add_the_loss_chunking_fixes(tiny):
    """With more than 256 MiB of logits per chip the re-planned fixes include whole logits (chunks
    hold head-sized gradient buffers: sometimes more memory) and a smaller logits budget."""
    small = plan_lib.fix_candidates(load_config(tiny), n_dp=4)
    assert not any(o[0].startswith("train.loss_chunk") for o in small)
    big = load_config(tiny, ["model.vocab_size=250112", "data.seq_len=1024", "train.global_batch=32"])
    fixes = plan_lib.fix_candidates(big, n_dp=4)  # 8 rows x 1024 x 250,112 x 4 B = 7.6 GiB per chip
    assert fixes[-2:] == [("train.loss_chunk=0",), ("train.loss_chunk_mib=256",)]
    unbudgeted = load_config(tiny, ["model.vocab_size=250112", "data.seq_len=1024", "train.global_batch=32",
                                    "train.loss_chunk_mib=0"])
    assert plan_lib.fix_candidates(unbudgeted, n_dp=4)[-1] == ("train.loss_chunk=128",)
