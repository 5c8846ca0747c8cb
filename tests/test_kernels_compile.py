"""Every Triton kernel, at every launch configuration its dispatcher chooses for the paper's two LLMs and
Gemma-2-9B (head_dim 256, soft-capped attention), compiles to a real cubin for an A100 (sm_80) and an
H100 (sm_90), and fits: shared memory within the architecture's limit, no spill stack in bf16, at most
FP32_SPILL_BUDGET bytes per thread in float32. Each is built as a launch at the paper's shapes builds it
(aligned pointers and strides; attention also for a T that is not a multiple of 16). On sm_90 the attention
dots' tensor-core layouts are checked too: they decide how much of a warpgroup's work reaches the tensor cores.
No GPU needed: tests/kernel_resources.py compiles with triton.compile(..., GPUTarget(...)) and reads
each cubin with the cuobjdump in triton's wheel. It runs in a subprocess, because this test session
runs Triton in its interpreter (TRITON_INTERPRET=1), which cannot compile. About 45 s on 2 cores with
an empty Triton cache; seconds once ~/.triton/cache holds the cubins.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# float32 kernels serve parity tests and --precision fp32, not speed. Two spill: the dK/dV program at
# d = 64 on sm_90 (472 B: two 32 x 64 float32 accumulators beside the k, v and score tiles at 4 warps)
# and the delta program at d = 256 on sm_80 (8 B); every other float32 kernel spills nothing.
FP32_SPILL_BUDGET = 1024


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLM4SEG_KERNELS")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said out loud to silence its warning
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "kernel_resources.py"), "--json"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_configuration_compiled_for_both_architectures(compiled):
    kernels = {row["kernel"] for row in compiled}
    assert {"attention forward", "attention delta", "attention dK/dV", "attention dQ", "rms_norm forward",
            "rms_norm backward", "rms_norm backward + dw", "swiglu forward", "swiglu backward"} == kernels
    assert {(row["dtype"], row["arch"]) for row in compiled} == {(d, a) for d in ("bf16", "fp32") for a in (80, 90)}


def test_shared_memory_fits_the_architecture(compiled):
    too_big = [row for row in compiled if row["shared"] > row["shared_limit"]]
    assert not too_big, too_big


def test_h100_dots_stack_the_warps_along_the_rows(compiled):
    """An H100 warpgroup multiplies 64-row bands. With the warps stacked along a tile's rows (warpsPerCTA
    [num_warps, 1]), each softmax row stays inside one warp's band and P feeds the next dot as it lies
    (attention._launch_config says why, and what each exception would cost). Every sm_90 bf16 dot is so,
    except dK/dV at d = 128 and Gemma-2's d = 256, whatever T."""
    unstacked = {(row["kernel"], row["shape"].split(" T ")[0]) for row in compiled
                 if row["arch"] == 90 and row["dtype"] == "bf16" and row["mma_warps"]
                 and row["mma_warps"] != [[row["num_warps"], 1]]}
    assert unstacked == {("attention dK/dV", "deepseek d128 g6"), ("attention forward", "gemma2-9b d256 g2 softcap"),
                         ("attention dK/dV", "gemma2-9b d256 g2 softcap"), ("attention dQ", "gemma2-9b d256 g2 softcap")}


def test_bf16_kernels_do_not_spill_and_fp32_stay_within_budget(compiled):
    assert not [row for row in compiled if row["dtype"] == "bf16" and row["spill"] > 0]
    assert not [row for row in compiled if row["dtype"] == "fp32" and row["spill"] > FP32_SPILL_BUDGET]
