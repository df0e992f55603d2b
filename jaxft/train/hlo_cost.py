"""What a compiled program costs, read from its optimized HLO text: the bytes each collective moves
(`jaxft plan`'s communication bound) and a per-kernel roofline floor (its step-time bound on GPUs,
where XLA gives no cost analysis).

The kernel floor charges every kernel the program launches (a fusion, a custom call, an unfused op)
max(bytes / HBM bandwidth, FLOPs / peak), loop bodies times their trip count, and sums them.
Bytes are the kernel's operands and results, except that an operand the kernel only slices counts
its slices and a result written in place (dynamic-update-slice, scatter) counts the update.  FLOPs
are the matrix products' (2 x output x contracted size; float32 operands at half the bf16 rate,
TF32) and cuDNN attention's (the QK and PV products, the backward 2.5x the forward, a causal mask
half).  It is a floor: no launch gaps, no imperfect overlap, vendor peaks.  What it is for: how far
a step is from its products alone, and which kernels hold it there.
"""

from __future__ import annotations

import collections
import math
import re

_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_COLLECTIVE_OP = re.compile(r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
# Ops that launch nothing (views, tuples, control flow, the second half of async pairs).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "opt-barrier",
         "partition-id", "replica-id", "while", "call", "conditional", "add-dependency", "domain"}


def _computations(hlo: str) -> tuple[dict[str, str], str]:
    """Computation name -> its text (header line first), and the entry computation's name."""
    comps: dict[str, str] = {}
    entry = None
    for b in re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ )", "\n" + hlo):
        m = re.match(r"(ENTRY )?%([\w.\-]+) ", b.strip())
        if m:
            comps[m.group(2)] = b
            entry = m.group(2) if m.group(1) else entry
    return comps, entry or next(iter(comps), "")


def _trip_count(line: str, comps: dict[str, str]) -> int:
    """The trip count of a `while` instruction: XLA's `known_trip_count` when the backend kept it,
    else read from its condition -- a counter compared `LT` against one s32 constant, the form
    `lax.scan` / `fori_loop` lower to (the TPU compiler drops the annotation); 1 when unknown."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", line)
    text = comps.get(cond.group(1), "") if cond else ""
    bounds = re.findall(r"= s32\[\]\S* constant\((\d+)\)", text)
    return int(bounds[0]) if len(bounds) == 1 and "direction=LT" in text else 1


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each chip moves per collective kind in an optimized HLO module, times the trip
    counts of enclosing loops (microbatches, a scan over layers): an all-gather's result, the
    array an all-reduce or reduce-scatter reduces (not the slice a chip keeps). A TPU
    ``all-reduce-scatter`` fusion (all-reduce + dynamic slice) counts as its reduce-scatter."""
    comps, entry = _computations(hlo)
    times: dict[str, int] = {}

    def visit(name: str, mult: int) -> None:
        if name not in comps or times.get(name, 0) >= mult:
            return
        times[name] = mult
        for line in comps[name].splitlines():
            trip = _trip_count(line, comps) if " while(" in line else 1
            for callee in re.findall(r"(?:body|to_apply|calls|condition|branch_computations)=\{?%([\w.\-]+)", line):
                visit(callee, mult * trip)

    visit(entry, 1)
    # TPU async collective fusions repeat one collective (same channel and shapes) in their start,
    # continuation and done computations: count each (channel, kind, shapes) once; channel_id
    # alone is not unique (all-reduce-scatter computations in and outside a scan share one).
    ops: dict[tuple, tuple[str, int, int]] = {}
    for name, mult in times.items():
        for i, line in enumerate(comps[name].splitlines()):
            found = _collective(line)
            if found:
                kind, shapes, size = found
                if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                    kind = "reduce-scatter"
                elif kind == "reduce-scatter":
                    size *= _group_size(line)
                channel = re.search(r"channel_id=(\d+)", line)
                key = (channel.group(1), kind, shapes) if channel else (name, i)
                ops[key] = (kind, size, max(mult, ops.get(key, ("", 0, 0))[2]))
    out: dict[str, int] = {}
    for kind, size, mult in ops.values():
        out[kind] = out.get(kind, 0) + size * mult
    return out


def _group_size(line: str) -> int:
    """Devices per replica group: ``{{0,1},{2,3}}``, ``[G,S]<=[N]``, ``mesh['a'=8,'b'=4] {'a'}``."""
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:
        sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'(\w+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    return int(iota.group(1)) if iota else 1


def _collective(line: str) -> tuple[str, tuple, int] | None:
    """(kind, the shapes moved, their bytes) of a collective HLO instruction; combined ops
    move a tuple of results."""
    m = _COLLECTIVE.search(line)
    if not m:
        return None
    shapes = _SHAPE.findall(m.group(1))
    if m.group(2) == "collective-permute":
        shapes = shapes[:1]  # (operand, result, contexts...)
    elif m.group(3) and m.group(2) == "all-gather" and len(shapes) % 2 == 0:
        shapes = shapes[len(shapes) // 2:]  # all-gather-start returns (operands, results)
    size = sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[t] for t, dims in shapes)
    return m.group(2), tuple(shapes), size


def _array_bytes(typ: str) -> int:
    """Bytes of an HLO type: an array, or the sum of a tuple's arrays (layouts ignored)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[t] for t, dims in _SHAPE.findall(typ))


def _dims(typ: str) -> list[int]:
    m = _SHAPE.search(typ)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _instructions(text: str) -> list[dict]:
    out = []
    for line in text.splitlines()[1:]:
        m = _INSTR.match(line)
        if m:
            out.append({"name": m.group(1), "type": m.group(2), "op": m.group(3), "args": m.group(4),
                        "operands": re.findall(r"%([\w.\-]+)", m.group(4)), "attrs": m.group(5),
                        "root": line.lstrip().startswith("ROOT ")})
    return out


def _product_flops(lhs_type: str, out_type: str, contracting: str) -> tuple[str, float]:
    lhs = _dims(lhs_type)
    k = math.prod(lhs[int(i.strip('"'))] for i in contracting.split(",") if i.strip('"'))
    m = _SHAPE.search(lhs_type)
    return (m.group(1) if m else "f32"), 2.0 * math.prod(_dims(out_type)) * k


def _fused_flops(comps: dict[str, str], name: str, seen: set[str]) -> dict[str, float]:
    """Product FLOPs in a fused computation and what it calls, by the left operand's dtype."""
    if name in seen or name not in comps:
        return {}
    seen.add(name)
    instrs = _instructions(comps[name])
    types = {i["name"]: i["type"] for i in instrs}
    flops: dict[str, float] = collections.Counter()
    for i in instrs:
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i["attrs"])
        if i["op"] == "dot" and m:
            dtype, f = _product_flops(types.get(i["operands"][0], ""), i["type"], m.group(1))
            flops[dtype] += f
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", i["attrs"]):
            for dtype, f in _fused_flops(comps, callee, seen).items():
                flops[dtype] += f
    return dict(flops)


def _fusion_bytes(text: str, operand_types: list[str]) -> int:
    """A fusion's traffic: an operand only sliced counts its slices, one updated in place
    (dynamic-update-slice, scatter) counts nothing and its result the update."""
    instrs = _instructions(text)
    by_name = {i["name"]: i for i in instrs}
    users: dict[str, list[dict]] = collections.defaultdict(list)
    for i in instrs:
        for o in i["operands"]:
            users[o].append(i)
    in_place = ("dynamic-update-slice", "scatter")

    def readers(name: str):  # (user, the value it reads), through bitcasts (views)
        for u in users[name]:
            yield from (readers(u["name"]) if u["op"] == "bitcast" else ((u, name),))

    total = 0
    for i in instrs:
        if i["op"] != "parameter":
            continue
        use = list(readers(i["name"]))
        if use and all(u["op"] in ("dynamic-slice", "slice", "gather") and u["operands"][0] == v for u, v in use):
            total += sum(_array_bytes(u["type"]) for u, _ in use)
        elif not (use and all(u["op"] in in_place and u["operands"][0] == v for u, v in use)):
            index = int(i["args"]) if i["args"].isdigit() else len(operand_types)
            total += _array_bytes(operand_types[index]) if index < len(operand_types) else 0
    root = next((i for i in instrs if i["root"]), None)
    if root is None:
        return total
    for out in ([by_name.get(o) for o in root["operands"]] if root["op"] == "tuple" else [root]):
        if out is None:
            continue
        if out["op"] in in_place:  # the update: dynamic-update-slice's operand 1, scatter's last
            update = by_name.get(out["operands"][1 if out["op"] == "dynamic-update-slice" else -1])
            total += _array_bytes(update["type"]) if update else 0
        else:
            total += _array_bytes(out["type"])
    return total


def _attention_flops(instr: dict, types: dict[str, str]) -> float:
    """A cuDNN fused attention call: batch x heads x L x S x head_dim x 2 products x 2."""
    q, k = (_dims(types.get(o, "")) for o in instr["operands"][:2])
    if len(q) != 4 or len(k) != 4:
        return 0.0
    b, length, heads, d = q  # [B, L, H, K] (XLA:GPU's layout for jax.nn.dot_product_attention)
    flops = 4.0 * b * heads * length * k[1] * d
    causal = re.search(r'"mask_type": ?"CAUSAL"', instr["attrs"])
    return flops * (0.5 if causal else 1.0) * (2.5 if "Backward" in instr["attrs"] else 1.0)


def kernel_launches(hlo: str) -> list[dict]:
    """Every kernel of the program: name, kind (products / attention / other), bytes, FLOPs by
    operand dtype, how many times it runs per execution, and the op it came from."""
    comps, entry = _computations(hlo)
    out: list[dict] = []

    def walk(name: str, times: int) -> None:
        instrs = _instructions(comps.get(name, ""))
        types = {i["name"]: i["type"] for i in instrs}
        for i in instrs:
            if i["op"] == "while":
                body = re.search(r"body=%([\w.\-]+)", i["attrs"])
                walk(body.group(1) if body else "", times * _trip_count(i["attrs"], comps))
                continue
            if i["op"] in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|branch_computations)=\{?%([\w.\-]+)", i["attrs"]):
                    walk(callee, times)
                continue
            if i["op"] in _FREE or i["op"].endswith("-done") or _COLLECTIVE_OP.fullmatch(i["op"]):
                continue
            operand_types = [types.get(o, "") for o in i["operands"]]
            callee = re.search(r"calls=%([\w.\-]+)", i["attrs"])
            kind, flops = "other", {}
            if i["op"] == "fusion" and callee:
                nbytes = _fusion_bytes(comps.get(callee.group(1), ""), operand_types)
                flops = _fused_flops(comps, callee.group(1), set())
            else:
                nbytes = _array_bytes(i["type"]) + sum(_array_bytes(t) for t in operand_types)
                contracting = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i["attrs"])
                               or re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', i["attrs"]))
                if "__cudnn$fmha" in i["attrs"]:
                    kind, flops = "attention", {"bf16": _attention_flops(i, types)}
                elif contracting and (i["op"] == "dot" or "__cublas$" in i["attrs"]):
                    dtype, f = _product_flops(operand_types[0], i["type"], contracting.group(1))
                    flops = {dtype: f}
            if kind == "other" and any(flops.values()):
                kind = "products"
            where = re.search(r'op_name="([^"]*)"', i["attrs"])
            out.append({"name": i["name"], "kind": kind, "bytes": nbytes, "flops": flops, "times": times,
                        "op": where.group(1) if where else i["op"]})

    walk(entry, 1)
    return out


def kernel_floor(hlo: str, peak_flops: float, hbm_bw: float, top: int = 0) -> dict:
    """The program's per-kernel roofline: seconds (each kernel's slower of memory and compute,
    summed), the bytes its kernels move, their FLOPs, launches, the same by kind; with ``top`` > 0 also the
    heaviest kernels that are not products (name, op, ms in all, runs)."""
    rate = {"bf16": peak_flops, "f16": peak_flops, "f8e4m3fn": peak_flops, "f8e5m2": peak_flops}
    by_kind: dict[str, dict[str, float]] = {}
    heavy = []
    for k in kernel_launches(hlo):
        compute = sum(f / rate.get(dtype, peak_flops / 2) for dtype, f in k["flops"].items())
        seconds = k["times"] * max(k["bytes"] / hbm_bw, compute)
        g = by_kind.setdefault(k["kind"], {"seconds": 0.0, "bytes": 0.0, "launches": 0, "flops": 0.0})
        g["seconds"] += seconds
        g["flops"] += k["times"] * sum(k["flops"].values())
        g["bytes"] += k["times"] * k["bytes"]
        g["launches"] += k["times"]
        if k["kind"] == "other":
            heavy.append((seconds, k))
    out = {key: sum(g[key] for g in by_kind.values()) for key in ("seconds", "bytes", "launches", "flops")}
    out["by_kind"] = by_kind
    if top:
        out["top"] = [{"name": k["name"], "op": k["op"], "ms": round(s * 1e3, 3), "runs": k["times"]}
                      for s, k in sorted(heavy, key=lambda x: -x[0])[:top]]
    return out
