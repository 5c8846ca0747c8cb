"""Compile every Triton kernel for real GPUs without one, and read each cubin's resources.

    python tests/kernel_resources.py            # a table: kernel, dtype, shape, arch -> registers, spill, shared

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) builds the same cubin a GPU would
run, and cuobjdump (shipped in triton's wheel) reports its registers per thread (REG), spill stack per
thread (STACK) and the shared memory it needs; the TTGIR says how the tensor-core (MMA) tiles spread
over the warps. Each launch configuration comes from the kernel's own _launch_config, the function its
dispatcher calls, for each architecture, so what is checked is what would launch there. The
shapes are the paper's two LLMs' (Llama-3.2-1B: D 2048, I 8192, 32/8 heads, d 64; DeepSeek-R1-Qwen-1.5B:
D 1536, I 8960, 12/2 heads, d 128) and Gemma-2-9B's soft-capped attention (16/8 heads, d 256) at T = 256,
in bf16 and fp32, for sm_80 (A100) and sm_90 (H100).
Must run where TRITON_INTERPRET is unset (tests/test_kernels_compile.py starts it in a subprocess).
"""
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ARCHS = (80, 90)
DTYPES = ("bf16", "fp32")
SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes per block: A100, H100
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FLOAT32_BUFFERS = ("lse_ptr", "delta_ptr", "rstd_ptr", "dw_partial_ptr")  # always float32, whatever the dtype


def signature(kernel, dtype: str) -> dict:
    types = {}
    for param in kernel.params:
        if param.is_constexpr:
            types[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            types[param.name] = "*fp32" if param.name in FLOAT32_BUFFERS else f"*{dtype}"
        elif param.name in ("eps", "qk_scale_log2", "sm_scale", "softcap_log2"):
            types[param.name] = "fp32"
        else:
            types[param.name] = "i32"
    return types


def resources(kernel, dtype: str, constexprs: dict, options: dict, arch: int) -> dict:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    usage = dict(item.split(":") for item in next(line for line in report.splitlines() if "REG:" in line).split())
    return {"registers": int(usage["REG"]), "spill": int(usage["STACK"]), "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps, "mma_warps": mma_warps(compiled.asm["ttgir"])}


def mma_warps(ttgir: str) -> list[list[int]]:
    """warpsPerCTA [along rows, along columns] of each distinct tensor-core layout of the kernel's dots."""
    layouts = re.findall(r"#ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), (\d+)\]", ttgir)
    return sorted([int(rows), int(cols)] for rows, cols in set(layouts))


def launches():
    """(kernel name, jitted kernel, shape label, constexprs, options, dtypes, archs) for every configuration to
    check (attention's configuration depends on the dtype and the architecture, so it yields one per pair)."""
    attention = importlib.import_module("kernels.attention")
    rms_norm = importlib.import_module("kernels.rms_norm")
    swiglu = importlib.import_module("kernels.swiglu")
    forward, delta, dk_dv, dq = attention._kernels()
    for (label, head_dim, group, softcap), dtype, arch in itertools.product(
            (("llama3.2-1b d64 g4", 64, 4, False), ("deepseek d128 g6", 128, 6, False),
             ("gemma2-9b d256 g2 softcap", 256, 2, True)), DTYPES, ARCHS):
        config = attention._launch_config(head_dim, 256, float32=dtype == "fp32", hopper=arch == 90)
        for name, kernel, part in (("attention forward", forward, "forward"), ("attention delta", delta, "delta"),
                                   ("attention dK/dV", dk_dv, "dk_dv"), ("attention dQ", dq, "dq")):
            constexprs = {key: value for key, value in config[part].items() if key.isupper()}
            options = {key: value for key, value in config[part].items() if not key.isupper()}
            constexprs["HEAD_DIM"] = head_dim
            if "GROUP" in kernel.arg_names:
                constexprs["GROUP"] = group
            if "SOFTCAP" in kernel.arg_names:
                constexprs["SOFTCAP"] = softcap
            yield name, kernel, label, constexprs, options, (dtype,), (arch,)
    rms_forward, rms_backward = rms_norm._kernels()
    for width in (2048, 1536):
        block_d, warps = rms_norm._launch_config(width)
        yield "rms_norm forward", rms_forward, f"D {width}", {"BLOCK_D": block_d}, {"num_warps": warps}, DTYPES, ARCHS
        for compute_dw in (False, True):
            yield (f"rms_norm backward{' + dw' if compute_dw else ''}", rms_backward, f"D {width}",
                   {"BLOCK_D": block_d, "COMPUTE_DW": compute_dw}, {"num_warps": warps}, DTYPES, ARCHS)
    swiglu_forward, swiglu_backward = swiglu._kernels()
    for width in (8192, 8960):
        block_i, warps = swiglu._launch_config(width)
        for name, kernel in (("swiglu forward", swiglu_forward), ("swiglu backward", swiglu_backward)):
            yield name, kernel, f"I {width}", {"BLOCK_I": block_i}, {"num_warps": warps}, DTYPES, ARCHS


def _compile_one(job: tuple) -> dict:
    """One (kernel name, constexprs, options, dtype, arch) job, in a worker process."""
    name, constexprs, options, dtype, arch = job
    kernel = next(k for n, k, _, c, o, _, _ in launches() if n == name and c == constexprs and o == options)
    return resources(kernel, dtype, constexprs, options, arch)


def table() -> list[dict]:
    """Every launch x dtype x arch; each distinct cubin compiled once, on every core (ptxas is single-threaded)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    planned, jobs = [], {}
    for name, kernel, label, constexprs, options, dtypes, archs in launches():
        for dtype in dtypes:
            for arch in archs:
                key = (name, json.dumps(constexprs, sort_keys=True), json.dumps(options, sort_keys=True), dtype, arch)
                jobs.setdefault(key, (name, constexprs, options, dtype, arch))  # shapes sharing a launch share a cubin
                planned.append((key, {"kernel": name, "shape": label, "dtype": dtype, "arch": arch}))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        compiled = dict(zip(jobs, pool.map(_compile_one, jobs.values())))
    return [{**row, **compiled[key], "shared_limit": SHARED_LIMIT[row["arch"]]} for key, row in planned]


if __name__ == "__main__":
    rows = table()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':24s} {'shape':26s} {'dtype':5s} {'arch':6s} {'warps':>5s} {'REG':>4s} {'spill':>6s} "
              f"{'shared':>8s}  MMA warps (rows x columns)")
        for r in rows:
            print(f"{r['kernel']:24s} {r['shape']:26s} {r['dtype']:5s} sm_{r['arch']:<3d} {r['num_warps']:5d} "
                  f"{r['registers']:4d} {r['spill']:6d} {r['shared']:8d}  "
                  + " ".join(f"{rows}x{cols}" for rows, cols in r["mma_warps"]))
