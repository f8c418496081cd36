"""Where each profiled device op comes from: per-op time mapped through the compiled HLO's
metadata to the JAX name stack (and the source line, where XLA keeps it in the text).

A profile names fusions (`loop_add_fusion.12`, `fusion.345`), not code. The optimised HLO text of
the same compiled step gives each instruction's `metadata={op_name=... [source_file=...
source_line=...]}`; for a fusion it is the metadata of its root, where its time goes. op_name is
the JAX name stack: transformations (`jvp(...)`, `transpose(...)` for the backward), Flax module
scopes and the `jax.named_scope`s the MoE code opens (`moe_route`, `moe_dispatch`,
`moe_experts`, `moe_combine`, ...). `attribute` sums the per-op times by that stack (its last
components) and by the JAX primitive, so a profile reads "moe_combine/token_sums/mul 6.1 ms"
instead of "loop_multiply_fusion.3 6.1 ms".
"""
from __future__ import annotations

import re
from collections import Counter

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s,]+)')


def instruction_metadata(hlo_text: str) -> dict[str, dict[str, str]]:
    """Instruction name -> its metadata fields (op_name, source_file, source_line, ...)."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = {k: v.strip('"') for k, v in _FIELD.findall(m.group(2))}
    return out


def source_of(meta: dict[str, str], project: tuple[str, ...] = ("onn_jax/", "bench/", "train/")) -> str:
    """`dir/file.py:line` of an instruction, shortened to the project's path where it is one."""
    path, line = meta.get("source_file", ""), meta.get("source_line", "")
    for root in project:
        if root in path:
            path = root + path.split(root, 1)[1]
            break
    else:
        path = path.rsplit("/", 2)[-1] if path else "?"
    return f"{path}:{line}" if line else path


def primitive_of(meta: dict[str, str]) -> str:
    """The last component of the op_name path (the JAX primitive, e.g. `mul`, `dot_general`)."""
    return meta.get("op_name", "?").rsplit("/", 1)[-1] or "?"


def kernel_to_instruction(kernel: str) -> str:
    """A GPU kernel's name as the HLO instruction it runs: XLA names a fusion's kernel after the
    instruction with `.` turned into `_` (`loop_add_fusion_3` runs `loop_add_fusion.3`)."""
    return re.sub(r"_(\d+)$", r".\1", kernel)


def scope_of(meta: dict[str, str], depth: int = 4) -> str:
    """The op_name stack without its outer jit(...) frames, the last `depth` components; a
    backward op keeps a `bwd:` mark (a transpose(...) frame on its stack)."""
    parts = [p for p in meta.get("op_name", "?").split(";")[0].split("/") if p and not p.startswith("jit(")]
    mark = "bwd:" if any(p.startswith("transpose(") for p in parts) else ""
    parts = [_unwrap(p) for p in parts]
    return mark + "/".join(parts[-depth:])


def _unwrap(part: str) -> str:
    """`transpose(jvp(moe_combine))` -> `moe_combine`."""
    while True:
        m = re.match(r"^(jvp|transpose|vmap|checkpoint|remat|pjit|shard_map)\((.*)\)$", part)
        if not m:
            return part
        part = m.group(2)


def attribute(op_ns: Counter, hlo_text: str, steps: int, top: int = 25) -> dict:
    """Per-step milliseconds of the profiled ops by name stack, by primitive, and by source
    line where the HLO text carries one."""
    meta = instruction_metadata(hlo_text)
    by_scope, by_primitive, by_source, unknown = Counter(), Counter(), Counter(), 0
    for name, ns in op_ns.items():
        m = meta.get(name) or meta.get(kernel_to_instruction(name))
        if m is None:
            unknown += ns
            continue
        by_scope[scope_of(m)] += ns
        by_primitive[primitive_of(m)] += ns
        if "source_file" in m:
            by_source[source_of(m)] += ns
    ms = lambda c: [[k, round(v / steps / 1e6, 3)] for k, v in c.most_common(top)]
    return {"by_scope": ms(by_scope), "by_primitive": ms(by_primitive), "by_source": ms(by_source),
            "unattributed_ms": round(unknown / steps / 1e6, 3)}
