"""Comparing our layer with a reference implementation: output and input gradient on the same input; the
reference being transformers' own layer of a checkpoint it wrote."""
import inspect
from pathlib import Path

import torch

# fp32 both, the same op order up to the attention's sums: 1e-5 / 1e-4 is a few ulps of fp32 at the
# tests' magnitudes (|y| ~ 5-13, |grad| ~ 20) summed over up to 256 tokens.
FORWARD_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4


def parity_errors(ours, reference, x: torch.Tensor, device: str = "cpu") -> tuple[float, float, torch.Tensor]:
    """ours(x) on `device` and reference(x) on the CPU, both backpropagated from one random output
    gradient -> (max |output difference|, max |input-gradient difference|, our output)."""
    x_ours, x_ref = x.to(device, copy=True).requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(x.shape[1]))
    y_ours.backward(grad_out.to(device))
    y_ref.backward(grad_out)
    return ((y_ours.cpu() - y_ref).abs().max().item(), (x_ours.grad.cpu() - x_ref.grad).abs().max().item(),
            y_ours)


def assert_frozen_layer_matches(ours, reference, T: int) -> None:
    """Our frozen layer against reference(x) on a seeded (2, T, hidden) input: output and input gradient
    within the tolerances above, and no gradient reaches our (frozen) weights."""
    x = torch.randn(2, T, ours.config.hidden_size, generator=torch.Generator().manual_seed(T))
    forward_error, gradient_error, _ = parity_errors(ours, reference, x)
    assert forward_error <= FORWARD_TOLERANCE and gradient_error <= GRADIENT_TOLERANCE, \
        f"forward error {forward_error:.3g}, input-gradient error {gradient_error:.3g}"
    assert all(p.grad is None for p in ours.parameters()), "frozen layer must not get weight grads"


def reference_layer(directory: Path, number: int) -> torch.nn.Module:
    """transformers' layer `number` (1-based) of the model saved in `directory`, float32, eager."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    layers = model.encoder.layer if config.model_type == "bert" else model.layers
    return layers[number - 1]


def reference_forward(reference: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' layer on x with no mask (non-causal) and, for the rotary families (Llama, Qwen2, Mistral,
    Gemma-2), the identity rotation cos = 1, sin = 0: RoPE-free, as this project's layer."""
    kwargs = {}
    if "position_embeddings" in inspect.signature(reference.forward).parameters:
        B, T, _ = x.shape
        head_dim = reference.self_attn.head_dim
        kwargs["position_embeddings"] = (torch.ones(B, T, head_dim), torch.zeros(B, T, head_dim))
    out = reference(x, attention_mask=None, **kwargs)
    return out[0] if isinstance(out, tuple) else out
