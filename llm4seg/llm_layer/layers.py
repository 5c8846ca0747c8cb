"""The decoder layer itself: its configuration, its modules, and the table of LLM families.

A Llama / Mistral / Qwen2 (and Yi) decoder layer is pre-norm:

    h   = x + o_proj(attention(q_proj(n1), k_proj(n1), v_proj(n1)))    n1 = rmsnorm(x; w_in)
    out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))               n2 = rmsnorm(h; w_post)

    rmsnorm(x; w) = w * x / sqrt(mean(x^2) + eps)          statistics in float32
    attention     = softmax(c q k^T) v per head, c = 1/sqrt(head_dim), grouped-query: kv head j
                    serves q heads j*g .. j*g+g-1, g = num_attention_heads / num_key_value_heads

The other families differ only in these places:
    Gemma-2  norms around both sublayers: h = x + rmsnorm'(attn(rmsnorm'(x))), out = h + rmsnorm'(mlp(rmsnorm'(h)))
             with rmsnorm' scaling by (1 + w); MLP gelu_tanh(gate) * up (GeGLU); c = query_pre_attn_scalar^-1/2;
             logits soft-capped, cap * tanh(s / cap) (attn_logit_softcapping, 50 in the 9B).
    BioGPT   pre-norm with LayerNorm (weight and bias), biased q/k/v/out_proj, MLP fc2(gelu(fc1(n2))).
    BERT     post-norm: h = LayerNorm(x + dense(attention(x))), out = LayerNorm(h + dense(gelu(dense(h)))),
             biased everything (BioBERT, ClinicalBERT are BERTs).

Unlike the LLM it came from, the layer runs **non-causally** (every image token sees every other)
and **without RoPE**: the tokens are CNN features that already carry their position. Mistral's and
Gemma-2's sliding windows (4,096 tokens) only restrict causal text attention over long contexts;
here every token attends to every token (a 256 x 256 image has 256 bottleneck tokens).
Attention and RMSNorm / SwiGLU are calls into `kernels` (Triton on CUDA); LayerNorm and GELU are PyTorch's.

Shapes: x (B, T, hidden_size) -> (B, T, hidden_size); q (B, Hq, T, head_dim), k and v
(B, Hkv, T, head_dim). Module names follow Hugging Face's, so the checkpoint tensor
`<prefix><name>` (prefix `model.layers.{i}.`, `biogpt.layers.{i}.`, `bert.encoder.layer.{i}.`, ...)
is this module's `<name>`. LAYER_CLASSES maps a config.json `model_type` to the class that runs
it: a new family is one class and one line there.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..files import InputError

MODES = ("frozen", "trainable", "random")
# config.json's activation name -> F.gelu's `approximate` (the MLPs of the GELU families)
GELUS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


@dataclass
class LayerConfig:
    """The shape of one decoder layer, read from the LLM's config.json, and where it came from."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float
    attention_bias: bool        # biases on q/k/v (Qwen2 always; Llama when its config says so)
    o_proj_bias: bool           # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool
    num_hidden_layers: int
    layer: int                  # 1-based, the paper's numbering
    repo: str | None = None     # Hub repo id, when fetched from the Hub
    path: str | None = None     # local directory or file, when read from disk
    commit: str | None = None   # the Hub commit the weights were read at
    initializer_range: float = 0.02
    activation: str = "silu"               # of the MLP: silu (SwiGLU), or a GELUS key
    attention_scale: float | None = None   # c in softmax(c q k^T); None = 1/sqrt(head_dim)
    softcap: float = 0.0                   # Gemma-2's attention logit soft-cap; 0 = none
    # What pins weights read from local files (a folder or a GGUF), as the commit pins a Hub layer's:
    # {"sha256": hex digest of the layer's tensors as stored, "files": [{"path", "size", "mtime_ns"}, ...]}.
    # None for a Hub layer and for mode "random" (no weights read).
    fingerprint: dict | None = None

    @property
    def index(self) -> int:
        """0-based index in the checkpoint: `model.layers.{index}`."""
        return self.layer - 1

    @property
    def source(self) -> str:
        return self.repo or self.path

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The names this layer's tensors may start with in a checkpoint (e.g. BERT's with and without
        `bert.`, as saved from BertForMaskedLM or BertModel); the first is the one written to caches."""
        return tuple(p.format(index=self.index) for p in LAYER_CLASSES[self.model_type].CHECKPOINT_PREFIXES)

    @property
    def prefix(self) -> str:
        return self.prefixes[0]

    @classmethod
    def from_hf(cls, hf: dict, layer: int, *, origin: str | None = None, **where) -> "LayerConfig":
        """The layer's config from `hf`, a config.json's settings read from the file `origin` (named in
        errors; the source by default). `where` (repo and commit, or path) says where the weights come
        from. A setting that is missing or of the wrong type or value raises files.InputError."""
        source = where.get("repo") or where.get("path")
        origin = origin or source
        if not isinstance(hf, dict):
            raise InputError(f"{origin}: expected a JSON object of the model's settings, got a JSON "
                             f"{type(hf).__name__}; restore the model's config.json")
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in LAYER_CLASSES:
            raise InputError(f"unsupported architecture {model_type!r} in {source}: supported are "
                             f"{', '.join(LAYER_CLASSES)}")
        num_layers = cls._count(hf, "num_hidden_layers", origin)
        if not 1 <= layer <= num_layers:
            raise InputError(f"layer {layer} out of range: {source} has layers 1..{num_layers} "
                             f"(1-based, as in the paper: layer N is model.layers.{{N-1}})")
        hidden, heads = cls._count(hf, "hidden_size", origin), cls._count(hf, "num_attention_heads", origin)
        kv_heads = cls._count(hf, "num_key_value_heads", origin, default=heads)
        if heads % kv_heads:
            raise InputError(f"{origin}: expected num_attention_heads ({heads}) to be a multiple of "
                             f"num_key_value_heads, got {kv_heads}; restore the model's config.json")
        if hf.get("head_dim") is None and hidden % heads:
            raise InputError(f"{origin}: expected hidden_size ({hidden}) to be a multiple of "
                             f"num_attention_heads, got {heads} (and no head_dim); restore the model's config.json")
        try:
            family = LAYER_CLASSES[model_type].read_config(hf, source)
        except KeyError as e:
            raise InputError(f"{origin}: expected {e.args[0]!r}, which every {model_type} config.json has, "
                             f"got none; restore the model's config.json") from e
        except ValueError as e:  # an activation the family does not use; the message names the source
            raise InputError(f"{e}; restore the model's config.json") from e
        except (TypeError, ZeroDivisionError) as e:  # e.g. query_pre_attn_scalar a string, or 0
            raise InputError(f"{origin}: a {model_type} setting has the wrong type or value ({e}); "
                             f"restore the model's config.json") from e
        config = cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=cls._count(hf, "intermediate_size", origin),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=cls._count(hf, "head_dim", origin, default=hidden // heads),
            num_hidden_layers=num_layers,
            layer=layer,
            initializer_range=hf.get("initializer_range", 0.02),
            **family,
            **where,
        )
        config._check_settings(origin)
        return config

    @staticmethod
    def _count(hf: dict, key: str, origin: str, default: int | None = None) -> int:
        """hf[key], a positive integer; `default` when the key is absent or null, if one is given."""
        value = hf.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{origin}: expected {key} to be a positive integer, got {value!r}; "
                             f"restore the model's config.json")
        return value

    def _check_settings(self, origin: str) -> None:
        """The settings besides the sizes have the types and ranges the layer needs."""
        must_be_positive = {"norm_eps": True, "attention_scale": True, "initializer_range": False, "softcap": False}
        for name, positive in must_be_positive.items():
            value = getattr(self, name)
            if name == "attention_scale" and value is None:
                continue  # the default, 1/sqrt(head_dim)
            real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not real or value < 0 or (positive and value == 0):
                raise InputError(f"{origin}: expected the layer's {name} to be a finite number "
                                 f"{'> 0' if positive else '>= 0'}, got {value!r}; restore the model's config.json")
        for name in ("attention_bias", "o_proj_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{origin}: expected true or false for the layer's {name} (config.json's "
                                 f"attention_bias / mlp_bias), got {getattr(self, name)!r}; "
                                 f"restore the model's config.json")

    def to_dict(self) -> dict:
        return asdict(self)


def _activation(hf: dict, source: str, allowed: tuple[str, ...]) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or allowed[0]
    if name not in allowed:
        raise ValueError(f"{source}: expected the MLP's activation (hidden_act) one of {', '.join(allowed)}, "
                         f"got {name!r}")
    return name


# ----------------------------------------------------------------------------------------------
# The parts


class RMSNorm(nn.Module):
    """w * x / rms(x); with offset=1 the scale is (1 + w), Gemma's convention (w starts at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps, self.offset = eps, offset

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight + self.offset if self.offset else self.weight, self.eps)


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, cfg: LayerConfig) -> Tensor:
    """Projected q (B, T, Hq*d), k and v (B, T, Hkv*d) -> (B, T, Hq*d): split the heads, attend
    non-causally (grouped-query, with the family's scale and soft-cap), merge the heads."""
    B, T, _ = q.shape
    q = q.view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)    # (B, Hq, T, d)
    k = k.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)    # (B, Hkv, T, d)
    v = v.view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)    # (B, Hkv, T, d)
    y = kernels.attention(q, k, v, scale=cfg.attention_scale, softcap=cfg.softcap)   # (B, Hq, T, d)
    return y.transpose(1, 2).reshape(B, T, cfg.num_attention_heads * cfg.head_dim)


class Attention(nn.Module):
    """Non-causal, RoPE-free grouped-query self-attention; `output` names the output projection
    (o_proj in Llama-style checkpoints, out_proj in BioGPT's)."""

    def __init__(self, cfg: LayerConfig, output: str = "o_proj"):
        super().__init__()
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        self.cfg, self.output = cfg, output
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.add_module(output, nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_proj_bias))

    def forward(self, x: Tensor) -> Tensor:
        y = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.cfg)
        return getattr(self, self.output)(y)


def gelu(x: Tensor, activation: str) -> Tensor:
    return F.gelu(x, approximate=GELUS[activation])


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu, on the kernel) or GeGLU (Gemma's tanh GELU)."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.activation = cfg.activation
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "silu":
            return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(gelu(self.gate_proj(x), self.activation) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# The layers: one class per family


class PretrainedLayer(nn.Module):
    """What every family shares: the mode, the dtype policy and the frozen-weights rule.

    In mode "frozen" no weight requires grad (gradients still flow to the input) and the frozen
    weights are left out of `state_dict()`: a training checkpoint stores what was trained, and
    `config` says how to fetch the rest. Loading such a state dict keeps the weights in place.
    """
    CHECKPOINT_PREFIXES = ("model.layers.{index}.",)
    LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")  # what LoRA adapts (model.add_lora)

    def __init__(self, config: LayerConfig, mode: str):
        super().__init__()
        self.config, self.mode = config, mode
        self.register_state_dict_post_hook(_drop_frozen_weights)
        self.register_load_state_dict_pre_hook(_keep_frozen_weights)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, hidden_size) -> (B, T, hidden_size), computed in the layer's dtype and returned
        in x's dtype (so fp32 adapters can feed a bf16 layer)."""
        return self.block(x.to(self.dtype)).to(x.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the layer's own weights (LoRA's lora_a / lora_b stay float32 beside them)."""
        return next(p.dtype for name, p in self.named_parameters() if ".lora_" not in name)

    def extra_repr(self) -> str:
        return f"{self.config.source} layer {self.config.layer} ({self.config.prefix[:-1]}), mode={self.mode}"


class DecoderLayer(PretrainedLayer):
    """Llama, Mistral, Qwen2 (and Llama-architecture models such as Yi): pre-norm, SwiGLU."""

    @staticmethod
    def read_config(hf: dict, source: str) -> dict:
        llama_bias = hf["model_type"] == "llama" and hf.get("attention_bias", False)
        return dict(norm_eps=hf["rms_norm_eps"], activation=_activation(hf, source, ("silu",)),
                    attention_bias=hf["model_type"] == "qwen2" or llama_bias, o_proj_bias=llama_bias,
                    mlp_bias=hf["model_type"] == "llama" and hf.get("mlp_bias", False))

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__(config, mode)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config)

    def block(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class Gemma2Layer(PretrainedLayer):
    """Gemma-2: four (1 + w) RMSNorms, GeGLU, scaled and soft-capped attention."""

    @staticmethod
    def read_config(hf: dict, source: str) -> dict:
        return dict(norm_eps=hf["rms_norm_eps"], activation=_activation(hf, source, ("gelu_pytorch_tanh",)),
                    attention_bias=hf.get("attention_bias", False), o_proj_bias=hf.get("attention_bias", False),
                    mlp_bias=False, attention_scale=hf["query_pre_attn_scalar"] ** -0.5,
                    softcap=hf.get("attn_logit_softcapping") or 0.0)

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__(config, mode)
        D, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = RMSNorm(D, eps, offset=1.0)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(D, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(D, eps, offset=1.0)
        self.mlp = GatedMLP(config)
        self.post_feedforward_layernorm = RMSNorm(D, eps, offset=1.0)

    def block(self, h: Tensor) -> Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class BioGptLayer(PretrainedLayer):
    """BioGPT: pre-norm with LayerNorm, biased projections, GELU MLP (fc1, fc2). transformers'
    BioGptDecoderLayer builds its LayerNorms with the default eps 1e-5, whatever config.json's
    layer_norm_eps says; so does this class, to equal it."""
    CHECKPOINT_PREFIXES = ("biogpt.layers.{index}.", "layers.{index}.")

    @staticmethod
    def read_config(hf: dict, source: str) -> dict:
        return dict(norm_eps=1e-5, activation=_activation(hf, source, tuple(GELUS)),
                    attention_bias=True, o_proj_bias=True, mlp_bias=True)

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__(config, mode)
        D, eps = config.hidden_size, config.norm_eps
        self.self_attn_layer_norm = nn.LayerNorm(D, eps=eps)
        self.self_attn = Attention(config, output="out_proj")
        self.final_layer_norm = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)

    def block(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.self_attn_layer_norm(h))
        return h + self.fc2(gelu(self.fc1(self.final_layer_norm(h)), self.config.activation))


class BertSelfAttention(nn.Module):
    """BERT's query / key / value projections and the attention; the output projection is apart."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.num_attention_heads * cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, width)
        self.key = nn.Linear(cfg.hidden_size, width)
        self.value = nn.Linear(cfg.hidden_size, width)

    def forward(self, x: Tensor) -> Tensor:
        return multi_head_attention(self.query(x), self.key(x), self.value(x), self.cfg)


def _bert_output(width: int, cfg: LayerConfig) -> nn.ModuleDict:
    """A sublayer's end: dense(width -> D), then LayerNorm of the residual sum."""
    return nn.ModuleDict({"dense": nn.Linear(width, cfg.hidden_size),
                          "LayerNorm": nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)})


class BertLayer(PretrainedLayer):
    """BERT (BioBERT, ClinicalBERT): post-norm, bidirectional already; names as in BertLayer."""
    CHECKPOINT_PREFIXES = ("bert.encoder.layer.{index}.", "encoder.layer.{index}.")
    LORA_TARGETS = ("attention.self.query", "attention.self.value")

    @staticmethod
    def read_config(hf: dict, source: str) -> dict:
        return dict(norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_activation(hf, source, tuple(GELUS)),
                    attention_bias=True, o_proj_bias=True, mlp_bias=True)

    def __init__(self, config: LayerConfig, mode: str = "frozen"):
        super().__init__(config, mode)
        D, I = config.hidden_size, config.intermediate_size
        self.attention = nn.ModuleDict({"self": BertSelfAttention(config), "output": _bert_output(D, config)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(D, I)})
        self.output = _bert_output(I, config)

    def block(self, h: Tensor) -> Tensor:
        attention_out = self.attention["output"]
        h = attention_out["LayerNorm"](h + attention_out["dense"](self.attention["self"](h)))
        hidden = gelu(self.intermediate["dense"](h), self.config.activation)
        return self.output["LayerNorm"](h + self.output["dense"](hidden))


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
LAYER_CLASSES = {"llama": DecoderLayer, "mistral": DecoderLayer, "qwen2": DecoderLayer, "gemma2": Gemma2Layer,
                 "biogpt": BioGptLayer, "bert": BertLayer}


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
    linear weights, zero biases, norms at unit scale: w = 1, or 0 for Gemma's 1 + w), drawn from
    torch's global RNG."""
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=layer.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.constant_(module.weight, 1.0 - module.offset)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return layer
