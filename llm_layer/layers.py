"""The decoder layer itself: its configuration, its modules, and the table of LLM families.

A Llama / Mistral / Qwen2 decoder layer is pre-norm:

    h   = x + o_proj(attention(q_proj(n1), k_proj(n1), v_proj(n1)))    n1 = rmsnorm(x; w_in)
    out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))               n2 = rmsnorm(h; w_post)

    rmsnorm(x; w) = w * x / sqrt(mean(x^2) + eps)          statistics in float32
    attention     = softmax(q k^T / sqrt(head_dim)) v per head, grouped-query: kv head j serves
                    q heads j*g .. j*g+g-1, g = num_attention_heads / num_key_value_heads

Unlike the LLM it came from, the layer runs **non-causally** (every image token sees every other)
and **without RoPE**: the tokens are CNN features that already carry their position.
Qwen2 adds biases to q/k/v. The three ops are calls into `kernels` (Triton on CUDA).

Shapes: x (B, T, hidden_size) -> (B, T, hidden_size); q (B, Hq, T, head_dim), k and v
(B, Hkv, T, head_dim). Module names follow Hugging Face's, so the checkpoint tensor
`model.layers.{i}.<name>` is this module's `<name>`. LAYER_CLASSES maps a config.json
`model_type` to the class that runs it: a new family is one class and one line there.
"""
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

import kernels

MODES = ("frozen", "trainable", "random")


@dataclass
class LayerConfig:
    """The shape of one decoder layer, read from the LLM's config.json, and where it came from."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool        # biases on q/k/v (Qwen2 always; Llama when its config says so)
    o_proj_bias: bool           # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool
    num_hidden_layers: int
    layer: int                  # 1-based, the paper's numbering
    repo: str | None = None     # Hub repo id, when fetched from the Hub
    path: str | None = None     # local directory or file, when read from disk
    commit: str | None = None   # the Hub commit the weights were read at
    initializer_range: float = 0.02

    @property
    def index(self) -> int:
        """0-based index in the checkpoint: `model.layers.{index}`."""
        return self.layer - 1

    @property
    def source(self) -> str:
        return self.repo or self.path

    @property
    def prefix(self) -> str:
        """The checkpoint names of this layer's tensors start with this."""
        return f"model.layers.{self.index}."

    @classmethod
    def from_hf(cls, hf: dict, layer: int, **where) -> "LayerConfig":
        model_type = hf.get("model_type")
        source = where.get("repo") or where.get("path")
        if model_type not in LAYER_CLASSES:
            raise ValueError(
                f"unsupported architecture {model_type!r} in {source}: supported are "
                f"{', '.join(LAYER_CLASSES)} (dense decoder layers with RMSNorm and SwiGLU)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: expected hidden_act 'silu' (SwiGLU), got {hf['hidden_act']!r}")
        num_layers = hf["num_hidden_layers"]
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layer {layer} out of range: {source} has layers 1..{num_layers} "
                             f"(1-based, as in the paper: layer N is model.layers.{{N-1}})")
        heads = hf["num_attention_heads"]
        llama_bias = model_type == "llama" and hf.get("attention_bias", False)
        return cls(
            model_type=model_type,
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf["rms_norm_eps"],
            attention_bias=model_type == "qwen2" or llama_bias,
            o_proj_bias=llama_bias,
            mlp_bias=model_type == "llama" and hf.get("mlp_bias", False),
            num_hidden_layers=num_layers,
            layer=layer,
            initializer_range=hf.get("initializer_range", 0.02),
            **where,
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# The parts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Non-causal, RoPE-free grouped-query self-attention."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        self.n_head, self.n_kv_head, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, Hq, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        y = kernels.attention(q, k, v)                                               # (B, Hq, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


# ----------------------------------------------------------------------------------------------
# The layer


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer (Llama, Mistral, Qwen2).

    In mode "frozen" no weight requires grad (gradients still flow to the input) and the frozen
    weights are left out of `state_dict()`: a training checkpoint stores what was trained, and
    `config` says how to fetch the rest. Loading such a state dict keeps the weights in place.
    """

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__()
        self.config, self.mode = config, mode
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_keep_frozen_weights)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, hidden_size) -> (B, T, hidden_size), computed in the layer's dtype and returned
        in x's dtype (so fp32 adapters can feed a bf16 layer)."""
        h = x.to(self.input_layernorm.weight.dtype)
        h = h + self.self_attn(self.input_layernorm(h))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.config.source} layer {self.config.layer} (model.layers.{self.config.index}), mode={self.mode}"


def _frozen_names(layer: nn.Module) -> list[str]:
    if layer.mode != "frozen":
        return []
    return [name for name, p in layer.named_parameters() if not p.requires_grad]


def _drop_frozen_weights(layer, state_dict, prefix, local_metadata):
    for name in _frozen_names(layer):
        state_dict.pop(prefix + name, None)


def _keep_frozen_weights(layer, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    params = dict(layer.named_parameters())
    for name in _frozen_names(layer):
        state_dict.setdefault(prefix + name, params[name].detach())


# config.json's model_type -> the module that runs that family's layer.
LAYER_CLASSES = {"llama": DecoderLayer, "mistral": DecoderLayer, "qwen2": DecoderLayer}


def build_layer(config: LayerConfig, mode: str = "frozen") -> nn.Module:
    """An uninitialised layer of config's family (build it under torch.device("meta") to
    allocate nothing, then load or initialise the weights)."""
    return LAYER_CLASSES[config.model_type](config, mode)


def expected_shapes(config: LayerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the layer holds, by module name, with its shape."""
    with torch.device("meta"):
        probe = build_layer(config)
    return {name: tuple(t.shape) for name, t in probe.named_parameters()}


def init_random_(layer: nn.Module) -> nn.Module:
    """The paper's "+Transformer" baseline: Hugging Face's initialisation (normal(0, 0.02)
    linear weights, zero biases, unit norm weights), drawn from torch's global RNG."""
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=layer.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    return layer
