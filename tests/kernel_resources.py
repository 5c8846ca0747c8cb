"""Compile every Triton kernel for real GPUs without one, and read each cubin's resources.

    python tests/kernel_resources.py            # a table: kernel, dtype, shape, arch -> registers, spill, shared

triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) builds the same cubin a GPU would
run, and cuobjdump (shipped in triton's wheel) reports its registers per thread (REG), spill stack per
thread (STACK) and the shared memory it needs; the TTGIR says how the tensor-core (MMA) tiles spread
over the warps. Each launch configuration comes from the kernel's own _launch_config, the function its
dispatcher calls, and is built with the specialisation a launch gets (multiples_of_16), so what is
checked is what would launch. The shapes are the paper's two LLMs' (Llama-3.2-1B: D 2048, I 8192, 32/8
heads, d 64; DeepSeek-R1-Qwen-1.5B: D 1536, I 8960, 12/2 heads, d 128) and Gemma-2-9B's soft-capped
attention (16/8 heads, d 256) at T = 256 (and a ragged T = 200 in bf16), in bf16 and fp32, for sm_80
(A100) and sm_90 (H100).
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


def multiples_of_16(kernel, aligned_T: bool) -> dict:
    """The specialisation a real launch gets. Triton compiles one build per pattern of which pointers are
    16-byte aligned and which integers are multiples of 16, and only where it knows that does it load 16
    bytes at a time and pipeline the loads (the unspecialised attention forward at d = 128 needed 221
    registers and 64 KiB of shared memory against 179 and 128 KiB). In this project every pointer is
    aligned (torch's allocations; q, k, v views start at multiples of d) and every stride and width is a
    multiple of 16 (d is; D and I are for every LLM listed). T is when the token count is (256, 4096),
    not when it is ragged (a 48 x 48 image gives 9 tokens), a second build."""
    def known(name: str) -> bool:
        return name.endswith("_ptr") or "stride" in name or name in ("D", "I") or (name == "T" and aligned_T)
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if not p.is_constexpr and known(p.name)}


def resources(kernel, dtype: str, constexprs: dict, options: dict, arch: int, aligned_T: bool = True) -> dict:
    source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs,
                       attrs=multiples_of_16(kernel, aligned_T))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
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
    """(kernel name, jitted kernel, shape label, constexprs, options, dtypes, aligned_T) for every configuration
    to check (attention's configuration depends on the dtype, so it yields one per dtype). Attention is built
    for T = 256 in both dtypes and, in bf16, for a ragged T = 200 (the same tiles, T not a multiple of 16)."""
    attention = importlib.import_module("llm4seg.kernels.attention")
    rms_norm = importlib.import_module("llm4seg.kernels.rms_norm")
    swiglu = importlib.import_module("llm4seg.kernels.swiglu")
    forward, delta, dk_dv, dq = attention._kernels()
    for (label, head_dim, group, softcap), (dtype, T) in itertools.product(
            (("llama3.2-1b d64 g4", 64, 4, False), ("deepseek d128 g6", 128, 6, False),
             ("gemma2-9b d256 g2 softcap", 256, 2, True)), (("bf16", 256), ("fp32", 256), ("bf16", 200))):
        config = attention._launch_config(head_dim, T, float32=dtype == "fp32")
        for name, kernel, part in (("attention forward", forward, "forward"), ("attention delta", delta, "delta"),
                                   ("attention dK/dV", dk_dv, "dk_dv"), ("attention dQ", dq, "dq")):
            constexprs = {key: value for key, value in config[part].items() if key.isupper()}
            options = {key: value for key, value in config[part].items() if not key.isupper()}
            constexprs["HEAD_DIM"] = head_dim
            if "GROUP" in kernel.arg_names:
                constexprs["GROUP"] = group
            if "SOFTCAP" in kernel.arg_names:
                constexprs["SOFTCAP"] = softcap
            yield name, kernel, f"{label} T {T}", constexprs, options, (dtype,), T % 16 == 0
    rms_forward, rms_backward = rms_norm._kernels()
    for width in (2048, 1536):
        block_d, warps = rms_norm._launch_config(width)
        yield "rms_norm forward", rms_forward, f"D {width}", {"BLOCK_D": block_d}, {"num_warps": warps}, DTYPES, True
        for compute_dw in (False, True):
            yield (f"rms_norm backward{' + dw' if compute_dw else ''}", rms_backward, f"D {width}",
                   {"BLOCK_D": block_d, "COMPUTE_DW": compute_dw}, {"num_warps": warps}, DTYPES, True)
    swiglu_forward, swiglu_backward = swiglu._kernels()
    for width in (8192, 8960):
        block_i, warps = swiglu._launch_config(width)
        for name, kernel in (("swiglu forward", swiglu_forward), ("swiglu backward", swiglu_backward)):
            yield name, kernel, f"I {width}", {"BLOCK_I": block_i}, {"num_warps": warps}, DTYPES, True


def _compile_one(job: tuple) -> dict:
    """One (kernel name, constexprs, options, dtype, arch, aligned_T) job, in a worker process."""
    name, constexprs, options, dtype, arch, aligned_T = job
    kernel = next(k for n, k, _, c, o, _, _ in launches() if n == name and c == constexprs and o == options)
    return resources(kernel, dtype, constexprs, options, arch, aligned_T)


def table() -> list[dict]:
    """Every launch x dtype x arch; each distinct cubin compiled once, on every core (ptxas is single-threaded)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    planned, jobs = [], {}
    for name, _kernel, label, constexprs, options, dtypes, aligned_T in launches():
        for dtype in dtypes:
            for arch in ARCHS:
                job = (name, constexprs, options, dtype, arch, aligned_T)
                key = json.dumps(job, sort_keys=True)
                jobs.setdefault(key, job)  # shapes sharing a launch share a cubin
                planned.append((key, {"kernel": name, "shape": label, "dtype": dtype, "arch": arch}))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        compiled = dict(zip(jobs, pool.map(_compile_one, jobs.values()), strict=True))
    return [{**row, **compiled[key], "shared_limit": SHARED_LIMIT[row["arch"]]} for key, row in planned]


if __name__ == "__main__":
    rows = table()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':24s} {'shape':32s} {'dtype':5s} {'arch':6s} {'warps':>5s} {'REG':>4s} {'spill':>6s} "
              f"{'shared':>8s}  MMA warps (rows x columns)")
        for r in rows:
            print(f"{r['kernel']:24s} {r['shape']:32s} {r['dtype']:5s} sm_{r['arch']:<3d} {r['num_warps']:5d} "
                  f"{r['registers']:4d} {r['spill']:6d} {r['shared']:8d}  "
                  + " ".join(f"{along_rows}x{along_columns}" for along_rows, along_columns in r["mma_warps"]))
