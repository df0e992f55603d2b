"""`jaxft.train.hlo_cost.kernel_floor`: the per-kernel roofline of an optimized XLA:GPU program, read
from its HLO text (the forms below are XLA:GPU's, cut down from the 1B step's program)."""

from __future__ import annotations

import textwrap

import pytest

from jaxft.train.hlo_cost import kernel_floor, kernel_launches

HLO = textwrap.dedent("""\
    HloModule jit_train_step, entry_computation_layout={()->()}

    %gemm_computation (p0: bf16[64,128], p1: bf16[128,256]) -> bf16[64,256] {
      %p0 = bf16[64,128]{1,0} parameter(0)
      %p1 = bf16[128,256]{1,0} parameter(1)
      ROOT %dot.1 = bf16[64,256]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
    }

    %fused_dus (param_0: bf16[4,64,256], param_1: s32[], param_2: bf16[64,256]) -> bf16[4,64,256] {
      %param_0 = bf16[4,64,256]{2,1,0} parameter(0)
      %param_2 = bf16[64,256]{1,0} parameter(2)
      %bitcast.1 = bf16[1,64,256]{2,1,0} bitcast(%param_2)
      %param_1 = s32[] parameter(1)
      %c0 = s32[] constant(0)
      ROOT %dus.1 = bf16[4,64,256]{2,1,0} dynamic-update-slice(%param_0, %bitcast.1, %param_1, %c0, %c0)
    }

    %fused_ds (param_0.1: f32[4,128,256], param_1.1: s32[]) -> f32[1,128,256] {
      %param_0.1 = f32[4,128,256]{2,1,0} parameter(0)
      %param_1.1 = s32[] parameter(1)
      %c1 = s32[] constant(0)
      ROOT %ds.1 = f32[1,128,256]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %c1, %c1), dynamic_slice_sizes={1,128,256}
    }

    %fused_view_slice (param_0.3: f32[4,128,256], param_1.3: s32[]) -> f32[128,256] {
      %param_0.3 = f32[4,128,256]{2,1,0} parameter(0)
      %view = f32[512,256]{1,0} bitcast(%param_0.3)
      %param_1.3 = s32[] parameter(1)
      %c2 = s32[] constant(0)
      ROOT %ds.2 = f32[128,256]{1,0} dynamic-slice(%view, %param_1.3, %c2), dynamic_slice_sizes={128,256}
    }

    %fused_scale (param_0.2: bf16[64,256]) -> f32[64,256] {
      %param_0.2 = bf16[64,256]{1,0} parameter(0)
      ROOT %convert.1 = f32[64,256]{1,0} convert(%param_0.2)
    }

    %body (arg: (s32[], bf16[4,64,256], f32[4,128,256], bf16[64,128])) -> (s32[], bf16[4,64,256], f32[4,128,256], bf16[64,128]) {
      %arg = (s32[], bf16[4,64,256]{2,1,0}, f32[4,128,256]{2,1,0}, bf16[64,128]{1,0}) parameter(0)
      %i = s32[] get-tuple-element(%arg), index=0
      %stack = bf16[4,64,256]{2,1,0} get-tuple-element(%arg), index=1
      %weights = f32[4,128,256]{2,1,0} get-tuple-element(%arg), index=2
      %x = bf16[64,128]{1,0} get-tuple-element(%arg), index=3
      %w = f32[1,128,256]{2,1,0} fusion(%weights, %i), kind=kLoop, calls=%fused_ds, metadata={op_name="jit(step)/while/body/dynamic_slice"}
      %wb = bf16[128,256]{1,0} convert(%w)
      %y = bf16[64,256]{1,0} fusion(%x, %wb), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/while/body/dot_general"}
      %stack.1 = bf16[4,64,256]{2,1,0} fusion(%stack, %i, %y), kind=kLoop, calls=%fused_dus
      %f = f32[64,256]{1,0} fusion(%y), kind=kLoop, calls=%fused_scale, metadata={op_name="jit(step)/while/body/convert_element_type"}
      %w2 = f32[128,256]{1,0} fusion(%weights, %i), kind=kLoop, calls=%fused_view_slice
      ROOT %t = (s32[], bf16[4,64,256]{2,1,0}, f32[4,128,256]{2,1,0}, bf16[64,128]{1,0}) tuple(%i, %stack.1, %weights, %x)
    }

    %cond (arg.1: (s32[], bf16[4,64,256], f32[4,128,256], bf16[64,128])) -> pred[] {
      %arg.1 = (s32[], bf16[4,64,256]{2,1,0}, f32[4,128,256]{2,1,0}, bf16[64,128]{1,0}) parameter(0)
      %j = s32[] get-tuple-element(%arg.1), index=0
      %n = s32[] constant(4)
      ROOT %lt = pred[] compare(%j, %n), direction=LT
    }

    ENTRY %main (q: bf16[2,128,8,64], k: bf16[2,128,2,64], v: bf16[2,128,2,64], t: (s32[], bf16[4,64,256], f32[4,128,256], bf16[64,128])) -> f32[16] {
      %q = bf16[2,128,8,64]{3,2,1,0} parameter(0)
      %k = bf16[2,128,2,64]{3,2,1,0} parameter(1)
      %v = bf16[2,128,2,64]{3,2,1,0} parameter(2)
      %t = (s32[], bf16[4,64,256]{2,1,0}, f32[4,128,256]{2,1,0}, bf16[64,128]{1,0}) parameter(3)
      %fmha = (bf16[2,8,128,64]{3,1,2,0}, f32[2,8,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type": "CAUSAL"}}
      %loop = (s32[], bf16[4,64,256]{2,1,0}, f32[4,128,256]{2,1,0}, bf16[64,128]{1,0}) while(%t), condition=%cond, body=%body
      %ar = f32[16]{0} all-reduce(f32[16]{0} %z), channel_id=1, to_apply=%add
      ROOT %out = f32[16]{0} copy(%ar)
    }
""")


def test_kernels_are_charged_their_traffic_and_products_with_loop_trips():
    by_name = {k["name"]: k for k in kernel_launches(HLO)}
    # the while loop's trip count read from its condition (4); views, tuples, collectives launch nothing
    assert sorted(by_name) == ["f", "fmha", "out", "stack.1", "w", "w2", "wb", "y"]
    assert {n: by_name[n]["times"] for n in ("w", "y", "stack.1", "f")} == dict.fromkeys(("w", "y", "stack.1", "f"), 4)
    # a slice of the stacked weights: the slice read and written, not the stack (and the s32 index)
    assert by_name["w"]["bytes"] == 2 * 128 * 256 * 4 + 4
    assert by_name["w2"]["bytes"] == by_name["w"]["bytes"]  # sliced through a view (bitcast) of the stack
    # the product: its operands and result; 2 x 64 x 256 x 128 FLOPs of bf16
    assert by_name["y"]["bytes"] == (64 * 128 + 128 * 256 + 64 * 256) * 2
    assert by_name["y"]["flops"] == {"bf16": 2.0 * 64 * 256 * 128} and by_name["y"]["kind"] == "products"
    # written in place into the stack: the update read and written
    assert by_name["stack.1"]["bytes"] == 2 * 64 * 256 * 2 + 4
    assert by_name["f"]["bytes"] == 64 * 256 * (2 + 4) and by_name["f"]["op"] == "jit(step)/while/body/convert_element_type"
    # cuDNN attention: QK and PV over 2 x 8 heads x 128 x 128 x 64, halved by the causal mask
    assert by_name["fmha"]["kind"] == "attention"
    assert by_name["fmha"]["flops"] == {"bf16": 4.0 * 2 * 8 * 128 * 128 * 64 / 2}


def test_the_floor_sums_each_kernel_s_slower_bound():
    peak, bw = 1e12, 1e9  # memory-bound products at this bandwidth; compute-bound at 1e15 bytes/s
    launches = kernel_launches(HLO)
    floor = kernel_floor(HLO, peak, bw, top=2)
    assert floor["launches"] == sum(k["times"] for k in launches)
    assert floor["bytes"] == sum(k["times"] * k["bytes"] for k in launches)
    assert floor["seconds"] == pytest.approx(floor["bytes"] / bw)
    assert floor["flops"] == pytest.approx(4 * 2.0 * 64 * 256 * 128 + 4.0 * 2 * 8 * 128 * 128 * 64 / 2)
    fast = kernel_floor(HLO, peak, 1e15)
    # products and attention at the bf16 peak, everything else at its (tiny) traffic time
    other = sum(k["times"] * k["bytes"] for k in launches if k["kind"] == "other") / 1e15
    assert fast["seconds"] == pytest.approx(fast["flops"] / peak + other)
    assert fast["by_kind"]["products"]["seconds"] == pytest.approx(4 * 2.0 * 64 * 256 * 128 / peak)
    # the heaviest kernels that are not products, for a reader
    assert sorted(t["name"] for t in floor["top"]) == ["w", "w2"]  # 256 KiB per run each; wb 192, f 96
    assert floor["top"][0]["runs"] == 4
