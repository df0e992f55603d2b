"""`jaxft plan CONFIG --topology v5p-256 [--num-slices N]`: per-chip memory, FITS / DOES NOT FIT,
FLOPs, collectives and a roofline step-time estimate for a TPU slice (libtpu: the `jaxft[tpu]` extra)
or GPU nodes (`--topology h100-8`; the CUDA plugin: the `jaxft[gpu-plan]` extra), from a CPU-only
machine, or for the local devices without `--topology`."""

from __future__ import annotations

import argparse
import json
import os
import sys

def _gb(n: float | None) -> str:
    """Binary units, as the compiler prints them."""
    if n is None:
        return "?"
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def _verdict(p) -> str:
    if p.fits is None:
        return "capacity unknown on this device (no verdict)"
    if p.fits:
        return f"FITS ({_gb(p.total)} of {_gb(p.capacity)}, {_gb(p.capacity - p.total)} free)"
    over = p.total - p.capacity if p.capacity else 0
    return f"DOES NOT FIT ({_gb(p.total)} needed, {_gb(p.capacity)} usable: over by {_gb(over)})"


def format_plan(p) -> str:
    mem = p.memory
    rows = [f"plan for {p.target}: mesh {' x '.join(f'{k}={v}' for k, v in p.mesh.items())}",
            "per chip:",
            f"  parameters        {_gb(mem['params']):>12}",
            f"  optimizer state   {_gb(mem['optimizer']):>12}",
            f"  batch, other      {_gb(mem['other_inputs']):>12}"]
    if mem.get("theta0"):
        rows.append(f"  theta0 (LT-SFT)   {_gb(mem['theta0']):>12}  kept beside the state")
    rows += [f"  temporaries       {_gb(mem['temporaries']):>12}  (gradients ~{_gb(mem['gradients'])}, "
             f"activations and workspace ~{_gb(mem['activations'])})",
             f"  outputs, code     {_gb(mem['outputs_not_aliased'] + mem['code']):>12}",
             f"  total             {_gb(mem['total']):>12}  {_verdict(p)}"]
    if p.compiler_error:
        rows.append(f"  compiler: {p.compiler_error}")
    compiled = (f"{p.flops['compiled']:.3e}" if p.flops["compiled"] else "n/a" if p.estimate else "- (no executable)")
    if p.estimate.get("kernels_s"):
        compiled += " (the compiled kernels' products: XLA:GPU gives no cost analysis)"
    if p.planning.get("cost_extrapolated"):
        compiled += " (scanned layers: extrapolated from small unrolled compiles)"
    rows.append(f"FLOPs per chip per step: compiled {compiled}, model {p.flops['model']:.3e}")
    if p.collectives:
        rows.append("collectives per chip per step: " + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(p.collectives.items())))
    e = p.estimate
    if e:
        hbm = "?" if e["hbm_s"] is None else f"{e['hbm_s'] * 1e3:,.1f}"
        # GPUs: each kernel at the slower of its traffic and its products, summed (hlo_cost.kernel_floor)
        kernels = f", kernels {e['kernels_s'] * 1e3:,.1f}" if e.get("kernels_s") else ""
        rows.append(f"roofline: step >= {e['step_s'] * 1e3:,.1f} ms (compute {e['compute_s'] * 1e3:,.1f}, "
                    f"HBM {hbm}{kernels}, ICI {e['ici_s'] * 1e3:,.1f}, DCN {e['dcn_s'] * 1e3:,.1f} ms): "
                    f"<= {e['tokens_per_s']:,.0f} tokens/s, MFU <= {100 * e['mfu']:.1f}%")
    rows.append(f"planning: compiled in {p.planning['compile_s']:.1f} s, peak host RSS "
                f"{p.planning['peak_host_rss'] / 2**30:.2f} GiB")
    if p.suggestions:
        rows.append("what would fit (each re-planned):")
        for s in p.suggestions:
            verdict = "FITS" if s.fits else "does not fit"
            rows.append(f"  --set {' --set '.join(s.overrides):<48} {verdict:>12}  {_gb(s.total)} per chip"
                        + (f", step >= {s.estimate['step_s'] * 1e3:,.1f} ms" if s.estimate and s.fits else ""))
        if not any(s.fits for s in p.suggestions):
            rows.append("  none of these fits alone: a larger slice, or combine them")
    return "\n".join(rows)


def _local_target():
    import jax

    from jaxft.train.metric_sinks import device_peak_flops

    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    capacity = stats.get("bytes_limit")
    return devices, {"target": f"{len(devices)} x {devices[0].device_kind} (local)", "chip": None,
                     "peak": device_peak_flops(), "capacity": capacity}


def cmd_plan(args: argparse.Namespace) -> int:
    if args.topology and "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; libtpu only describes the slice
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jaxft.config.loader import load_config
    from jaxft.train.chips import abstract_devices, parse_topology, topology_target
    from jaxft.train.plan import plan

    if args.topology:
        topology = parse_topology(args.topology, args.num_slices)
        devices, target = abstract_devices(topology), topology_target(topology)
    else:
        if args.num_slices != 1:
            raise ValueError("--num-slices needs --topology")
        devices, target = _local_target()
    result = plan(lambda o: load_config(args.config, o), args.overrides, devices, suggest=not args.no_suggest,
                  **target)
    print(json.dumps(result.to_json(), indent=1, default=str) if args.json else format_plan(result))
    return 0 if result.fits is not False else 1


def register(sub, command) -> None:
    p = command(sub, "plan", cmd_plan, config=True,
                help="compile the train step for a TPU slice or GPU nodes (from this machine) or the local "
                     "devices: per-chip memory, FITS / DOES NOT FIT, FLOPs, collectives, a roofline estimate, "
                     "and fixes that fit")
    p.add_argument("--topology", metavar="SLICE",
                   help="v5p-256, v5e-16 (v5litepod-16), v6e-8, v4-128 or a libtpu shape v5p:4x4x8 "
                        "(needs libtpu: pip install 'jaxft[tpu]'), or GPU nodes h100-8, h200-16 (two nodes), "
                        "a100-4 (needs pip install 'jaxft[gpu-plan]'); default: the local devices")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: this many slices over DCN "
                   "(set mesh.dcn_data / mesh.dcn_fsdp so their product matches)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-suggest", action="store_true", help="do not re-plan fixes when it does not fit")
