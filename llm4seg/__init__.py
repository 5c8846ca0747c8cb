"""LLM4Seg and MedVisionLlama: one frozen, pre-trained LLM decoder layer inside a segmentation network.

The library behind the entry scripts train.py, eval.py and sweep.py (beside this package, never imported
by it). The two names most users need:

    load_layer(llm, layer)   one decoder layer of a pre-trained LLM as a torch module, (B, N, D) -> (B, N, D),
                             non-causal and without RoPE; only that layer's bytes are read (llm_layer/)
    build_model(backbone, ...)  a CNN (2D or 3D) with the layer at its bottleneck, or MedVisionLlama's ViT
                             with it after the patch embedding (model/)

and LLMBridge(channels, layer, residual=False), the adapters around a layer, to put one into a network of
one's own: (B, C, *spatial) -> tokens (B, N, C) -> Linear(C, D) -> layer -> Linear(D, C) -> (B, C, *spatial).

The packages and modules, in reading order (README.md, "How to read this code"): llm_layer/, model/, vit,
kernels/ (imports nothing of the project), data/ (its images/ and volumes/ packages, the generated data),
training and losses (what train.py drives), metrics, analysis, pictures, runtime, checkpoints, cli, files,
sweeps, then what a run is: run_config (its settings, typed), settings (the flags, recipes and checks), task
(the kind of run, decided once), prediction (inference) and outputs (the files eval.py --images writes).
"""
from .llm_layer import load_layer
from .model import LLMBridge, build_model

__all__ = ["LLMBridge", "build_model", "load_layer"]
