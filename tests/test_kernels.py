"""Triton kernels (kernels/) against their PyTorch references: compiled on CUDA tensors where there is
a GPU, in Triton's CPU interpreter where there is none.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before anything imports triton, and every tensor
here is a CPU tensor. With a GPU, the same tests run the compiled kernels on CUDA tensors (plus bf16
attention, which the interpreter cannot check), and one more test runs this file again in a
subprocess with the GPU hidden, so the interpreter path is proven there too. The interpreter mode is
chosen per process (triton reads TRITON_INTERPRET when it jits), hence the subprocess. The kernels
are jitted on first Triton use, so this holds when another test file imported `kernels` earlier (a
subprocess test below proves it). Each Triton test forces LLM4SEG_KERNELS=triton.

Tolerances (atol = rtol unless stated), and why:
  fp32  1e-5   same float32 math; only the order of sums differs (errors ~1e-7 measured).
  fp16  2e-3   element-wise: kernel and eager round at different points, at most 2 ulp (2 x 2^-10).
  bf16  1.6e-2 element-wise: 2 ulp (2 x 2^-7). bf16 tl.dot is wrong in the interpreter (triton
               issue 11584), so bf16 attention is tested on CUDA only.
  attention fp16 / bf16 is compared with the float32 reference on the same low-precision inputs, so
  the bound measures the kernel's own rounding: O within 2 ulp; gradients within 4 ulp, because P
  and dS are rounded to the input dtype before their tl.dot, as on tensor cores. bf16's bounds are
  fp16's scaled by 2^-7 / 2^-10 = 8 (derived, not yet measured on a GPU).
"""
import os
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm4seg import kernels
from llm4seg.kernels.attention import attention_reference
from llm4seg.kernels.rms_norm import rms_norm_reference
from llm4seg.kernels.swiglu import swiglu_reference

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATTENTION_TOLERANCE = {torch.float16: {"output": 2e-3, "grad": 4e-3}, torch.bfloat16: {"output": 1.6e-2, "grad": 3.2e-2}}
# The interpreter's bf16 tl.dot is broken, so bf16 attention runs where the kernels are compiled.
ATTENTION_LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("LLM4SEG_KERNELS", "triton")


def ran_triton(y: torch.Tensor) -> bool:
    """True if `y` was produced by one of our Triton custom operators (llm4seg::<kernel>_forward)."""
    return y.grad_fn is not None and "llm4seg" in y.grad_fn.name()


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol)


def forward_backward(fn, inputs, grad_out_seed=0):
    """fn(*inputs) and the gradients of sum(out * dy) for a fixed random dy, w.r.t. every input
    that requires grad (None for the others)."""
    inputs = [t.detach().clone().to(DEVICE).requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.device, out.dtype)
    out.backward(dy)
    return out, [t.grad for t in inputs]


# ---------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, D", [(1, 576), (17, 96), (256, 96)])
def test_rms_norm_matches_reference(triton_path, dtype, T, D):
    torch.manual_seed(0)
    x = torch.randn(2, T, D).to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(D)).to(dtype).requires_grad_()
    out, (dx, dw) = forward_backward(lambda a, w: kernels.rms_norm(a, w, 1e-5), [x, weight])
    ref, (dx_ref, dw_ref) = forward_backward(lambda a, w: rms_norm_reference(a, w, 1e-5), [x, weight])
    assert ran_triton(out) and out.dtype == ref.dtype
    tol = TOLERANCE[dtype]
    assert_close(out, ref, tol)
    assert_close(dx, dx_ref, tol)
    # dw sums 2*T rows; the relative bound still holds because every term is rounded once.
    assert_close(dw, dw_ref, tol)


def test_rms_norm_frozen_weight_gets_no_gradient(triton_path):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 576, requires_grad=True)
    weight = 1 + 0.1 * torch.randn(576)  # frozen: the kernel skips the weight-gradient partials
    out, (dx, dw) = forward_backward(lambda a, w: kernels.rms_norm(a, w, 1e-6), [x, weight])
    _, (dx_ref, _) = forward_backward(lambda a, w: rms_norm_reference(a, w, 1e-6), [x, weight])
    assert ran_triton(out) and dw is None
    assert_close(dx, dx_ref, TOLERANCE[torch.float32])


# ---------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, I", [(1, 96), (17, 1536), (256, 160)])
def test_swiglu_matches_reference(triton_path, dtype, T, I):
    torch.manual_seed(0)
    gate = (3 * torch.randn(2, T, I)).to(dtype).requires_grad_()  # wide enough to reach silu's tails
    up = torch.randn(2, T, I).to(dtype).requires_grad_()
    out, grads = forward_backward(kernels.swiglu, [gate, up])
    ref, grads_ref = forward_backward(swiglu_reference, [gate, up])
    assert ran_triton(out)
    for actual, expected in zip([out, *grads], [ref, *grads_ref], strict=True):
        assert_close(actual, expected, TOLERANCE[dtype])


def test_swiglu_reads_strided_rows_of_a_fused_projection(triton_path):
    torch.manual_seed(0)
    fused = torch.randn(2, 17, 2 * 8960, requires_grad=True)  # Qwen's ragged width 8960
    out, (d_fused,) = forward_backward(lambda f: kernels.swiglu(*f.chunk(2, dim=-1)), [fused])
    ref, (d_fused_ref,) = forward_backward(lambda f: swiglu_reference(*f.chunk(2, dim=-1)), [fused])
    assert ran_triton(out)
    assert_close(out, ref, TOLERANCE[torch.float32])
    assert_close(d_fused, d_fused_ref, TOLERANCE[torch.float32])


# ---------------------------------------------------------------------------------------------
# Attention


def qkv(B, Hq, Hkv, T, d, dtype, heads_last):
    """q (B, Hq, T, d), k, v (B, Hkv, T, d); with heads_last they are transposed views of
    (B, T, H, d) tensors, the layout a projection produces (and llm_layer passes)."""
    torch.manual_seed(0)
    if heads_last:
        shapes = [(B, T, Hq, d), (B, T, Hkv, d), (B, T, Hkv, d)]
        return [torch.randn(s).to(dtype).transpose(1, 2).requires_grad_() for s in shapes]
    shapes = [(B, Hq, T, d), (B, Hkv, T, d), (B, Hkv, T, d)]
    return [torch.randn(s).to(dtype).requires_grad_() for s in shapes]


ATTENTION_CASES = [  # (B, Hq, Hkv, T, d, heads_last): GQA groups 6, 3, 1; ragged and tiny T
    (1, 6, 1, 17, 64, True),
    (2, 6, 2, 17, 128, True),
    (1, 3, 3, 1, 64, True),
    (1, 3, 3, 256, 64, False),  # the one long sequence: 4 x 4 blocks of 64
    (1, 2, 1, 40, 16, True),  # the smallest tl.dot side
    (1, 2, 1, 33, 256, False),  # the largest head_dim, BLOCK_N = 32
    (1, 4, 2, 19, 80, True),  # head_dims that are multiples of 16 but not powers of two: the tile is
    (1, 3, 1, 24, 96, False),  # padded to the next power of two and the extra columns masked
    (1, 2, 2, 9, 112, True),
]


@pytest.mark.parametrize("B, Hq, Hkv, T, d, heads_last", ATTENTION_CASES)
def test_attention_float32_matches_reference(triton_path, B, Hq, Hkv, T, d, heads_last):
    inputs = qkv(B, Hq, Hkv, T, d, torch.float32, heads_last)
    out, grads = forward_backward(kernels.attention, inputs)
    ref, grads_ref = forward_backward(attention_reference, inputs)
    assert ran_triton(out)
    for actual, expected in zip([out, *grads], [ref, *grads_ref], strict=True):
        assert_close(actual, expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", ATTENTION_LOW_PRECISION)
@pytest.mark.parametrize("B, Hq, Hkv, T, d", [
    (1, 6, 2, 17, 64), (1, 3, 3, 1, 128), (1, 6, 1, 40, 128),
    (1, 4, 1, 150, 128),  # the forward's 128-row tiles at d = 128: one full row block and a ragged one
])
def test_attention_low_precision_matches_float32_reference(triton_path, dtype, B, Hq, Hkv, T, d):
    inputs = qkv(B, Hq, Hkv, T, d, dtype, heads_last=True)
    out, grads = forward_backward(kernels.attention, inputs)
    ref, grads_ref = forward_backward(attention_reference, [t.detach().float().requires_grad_() for t in inputs])
    assert ran_triton(out) and out.dtype == dtype
    assert_close(out, ref, ATTENTION_TOLERANCE[dtype]["output"])
    for actual, expected in zip(grads, grads_ref, strict=True):
        assert actual.dtype == dtype
        assert_close(actual, expected, ATTENTION_TOLERANCE[dtype]["grad"])


# Gemma-2: a scale other than 1/sqrt(d) and soft-capped logits. A cap of 2 on logits of std ~2.4
# (scale 0.3, d = 64) binds often, so tanh and its derivative are exercised, not just the identity.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, T, d", [(2, 4, 2, 17, 64), (1, 2, 1, 33, 256)])  # d 256: Gemma-2-9B's
def test_attention_with_scale_and_softcap_matches_reference(triton_path, dtype, B, Hq, Hkv, T, d):
    options = dict(scale=0.3 * 8 / d ** 0.5, softcap=2.0)
    inputs = qkv(B, Hq, Hkv, T, d, dtype, heads_last=True)
    out, grads = forward_backward(lambda q, k, v: kernels.attention(q, k, v, **options), inputs)
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref, grads_ref = forward_backward(lambda q, k, v: attention_reference(q, k, v, **options), reference_inputs)
    assert ran_triton(out)
    uncapped = attention_reference(*reference_inputs, scale=options["scale"])
    assert (ref.cpu() - uncapped).abs().max() > 0.05  # the cap changes the result
    tolerance = {"output": TOLERANCE[dtype], "grad": TOLERANCE[dtype]} if dtype == torch.float32 else ATTENTION_TOLERANCE[dtype]
    assert_close(out, ref, tolerance["output"])
    for actual, expected in zip(grads, grads_ref, strict=True):
        assert_close(actual, expected, tolerance["grad"])


def test_attention_refuses_a_negative_softcap():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="expected softcap >= 0"):
        kernels.attention(q, q, q, softcap=-1.0)


@pytest.mark.parametrize("d", [8, 72, 272])
def test_attention_rejects_head_dim_the_kernel_cannot_tile(triton_path, d):
    q = torch.randn(1, 2, 5, d, device=DEVICE)
    with pytest.raises(ValueError, match=f"a multiple of 16 from 16 to 256, got {d}"):
        kernels.attention(q, q, q)


# ---------------------------------------------------------------------------------------------
# The whole decoder layer


@pytest.fixture
def small_layer(tmp_path):
    """llm_layer's DecoderLayer, random init, head_dim 16, GQA group 3, float32, and an input (2, 17, 96)."""
    from llm4seg import llm_layer

    config = dict(model_type="llama", hidden_size=96, intermediate_size=160, num_attention_heads=6,
                  num_key_value_heads=2, num_hidden_layers=2, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    layer = llm_layer.load_layer(str(tmp_path), 1, mode="random", dtype=torch.float32)
    return layer, torch.randn(2, 17, 96, requires_grad=True)


def layer_outputs(layer, x, monkeypatch, path, compile_=False):
    """(output, input gradient, {parameter: gradient}) of one forward + backward on a kernel path."""
    monkeypatch.setenv("LLM4SEG_KERNELS", path)
    layer.to(DEVICE).zero_grad(set_to_none=True)
    run = torch.compile(layer, fullgraph=True) if compile_ else layer
    out, (dx,) = forward_backward(run, [x])
    return out, dx, {name: p.grad for name, p in layer.named_parameters()}


def assert_same_layer_outputs(actual, expected, tol):
    out, dx, param_grads = actual
    out_ref, dx_ref, param_grads_ref = expected
    assert_close(out, out_ref, tol)
    assert_close(dx, dx_ref, tol)
    for name, grad in param_grads.items():  # the weights' grads pass through every kernel backward
        assert_close(grad, param_grads_ref[name], tol)


def test_decoder_layer_on_kernels_equals_reference_path(small_layer, monkeypatch):
    """The same output and gradients on the Triton path as on the reference path."""
    layer, x = small_layer
    assert_same_layer_outputs(layer_outputs(layer, x, monkeypatch, "triton"),
                              layer_outputs(layer, x, monkeypatch, "torch"), TOLERANCE[torch.float32])


def test_torch_compile_fullgraph_runs_through_the_kernels(small_layer, monkeypatch):
    """The kernels are custom operators with fake (shape-only) versions and autograd formulas, so
    torch.compile(fullgraph=True) (inductor) traces the whole layer, forward and backward, with no graph
    break, and calls the Triton kernels (here in the interpreter) inside the compiled graph."""
    import importlib

    torch._dynamo.reset()
    layer, x = small_layer
    launches = {}
    for name in ("rms_norm", "swiglu", "attention"):  # count the calls that fetch the jitted kernels to launch
        module = importlib.import_module(f"llm4seg.kernels.{name}")
        monkeypatch.setattr(module, "_kernels", lambda get=module._kernels, name=name: (
            launches.__setitem__(name, launches.get(name, 0) + 1), get())[1])
    compiled = layer_outputs(layer, x, monkeypatch, "triton", compile_=True)
    # Two RMSNorms, one SwiGLU, one attention, each launched once forward and once backward.
    assert launches == {"rms_norm": 4, "swiglu": 2, "attention": 2}
    assert_same_layer_outputs(compiled, layer_outputs(layer, x, monkeypatch, "triton"), TOLERANCE[torch.float32])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Dispatch


def small_inputs(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, device=device, requires_grad=True)
    q = torch.randn(1, 2, 3, 16, device=device, requires_grad=True)
    return [(kernels.rms_norm, (x, torch.ones(32, device=device), 1e-5)), (kernels.swiglu, (x, x)),
            (kernels.attention, (q, q, q))]


@pytest.mark.parametrize("choice", [None, "torch"])
def test_cpu_default_and_forced_torch_run_the_reference(monkeypatch, choice):
    if choice is None:
        monkeypatch.delenv("LLM4SEG_KERNELS", raising=False)
    else:
        monkeypatch.setenv("LLM4SEG_KERNELS", choice)
    for fn, args in small_inputs("cpu"):
        assert not ran_triton(fn(*args))


def test_forced_triton_runs_the_kernels(triton_path):
    for fn, args in small_inputs(DEVICE):
        assert ran_triton(fn(*args))


def test_dispatch_errors_say_what_to_do(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("LLM4SEG_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected 'triton', 'torch' or unset, got 'cuda'"):
        kernels.swiglu(x, x)
    monkeypatch.setenv("LLM4SEG_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        kernels.swiglu(x, x)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    clean_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLM4SEG_KERNELS")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean_env, **env},
                          capture_output=True, text=True, timeout=120)


def test_import_and_reference_path_work_without_triton():
    code = """
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # as if triton were not installed
import os, torch
from llm4seg import kernels
x = torch.randn(2, 3, 8)
assert torch.equal(kernels.swiglu(x, x), torch.nn.functional.silu(x) * x)
os.environ["LLM4SEG_KERNELS"] = "triton"
try:
    kernels.swiglu(x, x)
except ImportError as error:
    print(error)
"""
    result = run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "needs the triton package" in result.stdout


def test_interpreter_enabled_after_kernels_were_imported():
    """The kernels are jitted on first use, so setting TRITON_INTERPRET after `import kernels`
    (another test file imported it first) still runs them in the interpreter."""
    code = """
import os, torch
from llm4seg import kernels
os.environ["TRITON_INTERPRET"] = "1"
os.environ["LLM4SEG_KERNELS"] = "triton"
x = torch.randn(2, 3, 8)
print(torch.allclose(kernels.swiglu(x, x), torch.nn.functional.silu(x) * x, atol=1e-6))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_triton_imported_before_the_interpreter_flag_is_a_clear_error():
    code = """
import os, torch, triton
from llm4seg import kernels  # triton's helpers are compiled-mode from here on
os.environ["TRITON_INTERPRET"] = "1"
os.environ["LLM4SEG_KERNELS"] = "triton"
x = torch.randn(2, 3, 8)
try:
    kernels.swiglu(x, x)
except RuntimeError as error:
    print(error)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "set TRITON_INTERPRET=1 before anything imports triton" in result.stdout


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.4.6", False)])
def test_interpreter_refuses_an_old_triton_with_numpy_2_4_in_one_sentence(monkeypatch, triton_version, numpy_version,
                                                                          refused):
    """triton 3.6's interpreter fails on every runtime loop bound with numpy 2.4 (checked by hand:
    21 of these tests failed with 'only 0-dimensional arrays can be converted to Python scalars')."""
    import numpy

    from llm4seg.kernels._dispatch import check_interpreter_numpy

    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if refused:
        with pytest.raises(RuntimeError, match=f"triton {triton_version} cannot run with numpy {numpy_version}: "
                                               "install numpy<2.4 or triton>=3.7"):
            check_interpreter_numpy(triton_version)
    else:
        check_interpreter_numpy(triton_version)


if DEVICE.type == "cuda":  # defined only where there is a GPU; without one the whole file is this run
    def test_the_interpreter_runs_this_file_with_the_gpu_hidden():
        """The CPU-interpreter half of the kernel tests, on a GPU machine: this file in a fresh process
        with CUDA hidden (so TRITON_INTERPRET=1 is set by conftest.py before triton is imported)."""
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLM4SEG_KERNELS")}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                                cwd=REPO, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert " passed" in result.stdout and " failed" not in result.stdout
