"""The paper's feature analysis (Sec. 4.2, Fig. 2): what the LLM layer does to the bottleneck features.

On bottleneck features (B, C, H, W):
    activation map   A = minmax(mean_c |f_c|) in [0, 1], (B, H, W): the paper's "Act. Before/After"
    concentration    IoU(A > 0.4, G) with A upsampled to the mask's size: Fig. 2(b)
    effective rank   per channel c, sigma = svdvals(f_c) (f_c is an H x W matrix), p = sigma / sum(sigma),
                     ER_c = exp(-sum_i p_i log p_i) (Roy & Vetterli 2007): "the entropy of the singular
                     values, normalized by their sum", exponentiated so a rank-r map with equal singular
                     values has ER r; averaged over channels
    LSVR             LSVR_c = -log(sigma_1 / sum(sigma)): "the ratio of the largest singular value to the
                     other singular values, on a negative logarithmic scale"; 0 for a rank-1 map, larger
                     when the spectrum is spread; averaged over channels
Channels that are exactly zero have no spectrum and are left out of the channel average.

Which tensors --analyze reads: the paper's model is t = Encoder(x), t_hat' = Reshape(Transformer(Flatten(t))),
Decoder(t_hat') (its Eq. 1-3), and Sec. 4.2 takes "the activations t_hat' in R^{C x H x W} before
decoding". Here that is the bridge's output (B, C, h, w), after Linear(D, C), which the decoder reads;
"Act. Before" (Fig. 2a/b) is the bridge's input, the encoder's (B, C, h, w) bottleneck. Both sit at the
CNN's width C (not the LLM's D), so before and after are comparable with each other and with a plain
backbone's bottleneck, the paper's CMUNeXt column. ER and LSVR are reported for both as well.
`BridgeFeatures` keeps both tensors of the latest forward pass (a forward hook on model.bridge) and
`feature_analysis` turns them into per-image values "<name>_<before|after>".
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import THRESHOLD, confusion_counts, iou_and_dice
from .model import BACKBONES

CONCENTRATION_THRESHOLD = 0.4  # paper Fig. 2(b)
ANALYSED = ("concentration_iou", "effective_rank", "lsvr")


def cannot_analyze(model: dict) -> str | None:
    """Why the analysis cannot read a run's model (config.json's "model"), or None when it can: it compares a 2D
    CNN's bottleneck feature maps before and after the LLM layer (the paper's Fig. 2, Sec. 4.2); the model's
    row in BACKBONES says whether it has such maps."""
    backbone = model["backbone"]
    row = BACKBONES.get(backbone)
    if row is None:
        return f"its backbone {backbone!r} is none of this version's ({', '.join(BACKBONES)})"
    if not row.feature_maps:
        return f"the {backbone} backbone has no bottleneck feature maps"
    if 2 not in row.spatial_dims:
        return f"it draws a 2D CNN's bottleneck maps (Fig. 2), and this run is a {row.spatial_dims[0]}D {backbone}"
    if model["mode"] == "none":
        return (f"it compares the features before and after the LLM layer, and this run is a plain {backbone} "
                "(trained with --llm none): expected a run with an LLM bridge")
    return None


def activation_map(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B, H, W): mean over channels of |features|, min-max scaled to [0, 1]
    per image. A constant map becomes all zeros."""
    activation = features.abs().mean(1)  # (B, H, W)
    low = activation.amin((1, 2), keepdim=True)
    high = activation.amax((1, 2), keepdim=True)
    return (activation - low) / (high - low).clamp_min(torch.finfo(activation.dtype).tiny)


def upsample_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps (B, h, w) -> (B, H, W) = size, bilinear; values stay in the input's range."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def concentration_iou(activation: Tensor, mask: Tensor,
                      threshold: float = CONCENTRATION_THRESHOLD) -> Tensor:
    """activation (B, H, W) in [0, 1], mask (B, H, W) or (B, 1, H, W) -> (B,) IoU of (activation > threshold)
    with (mask > 0.5), smoothed as the segmentation IoU. Upsample the map to the mask's size first."""
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if activation.shape != mask.shape:
        raise ValueError(f"expected an activation map of the mask's shape {tuple(mask.shape)}, got "
                         f"{tuple(activation.shape)}; bring it to the mask's size with upsample_map")
    c = confusion_counts(activation > threshold, mask > THRESHOLD)
    return iou_and_dice(c["tp"], c["fp"], c["fn"])[0]


def _channel_spectra(features: Tensor) -> tuple[Tensor, Tensor]:
    """features (B, C, H, W) -> normalised singular values p (B, C, K), K = min(H, W), descending,
    and which channels have any spectrum at all (B, C) bool."""
    singular_values = torch.linalg.svdvals(features.float())  # (B, C, K): one SVD per H x W channel map
    total = singular_values.sum(-1, keepdim=True)  # (B, C, 1)
    return singular_values / total.clamp_min(torch.finfo(total.dtype).tiny), total[..., 0] > 0


def _mean_over_channels(values: Tensor, has_spectrum: Tensor) -> Tensor:
    """values, has_spectrum (B, C) -> (B,) mean over the channels with a spectrum (NaN if none has)."""
    return torch.where(has_spectrum, values, 0).sum(1) / has_spectrum.sum(1)


def effective_rank(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B,) entropy effective rank exp(-sum p log p), p = sigma / sum(sigma),
    per channel map, averaged over channels. Rank-1 map: 1; H x H identity: H. Mean over images: .mean()."""
    p, has_spectrum = _channel_spectra(features)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # (B, C); xlogy makes 0 log 0 = 0
    return _mean_over_channels(entropy.exp(), has_spectrum)


def lsvr(features: Tensor) -> Tensor:
    """features (B, C, H, W) -> (B,) largest-singular-value ratio -log(sigma_1 / sum(sigma)) per channel map,
    averaged over channels. Rank-1 map: 0; H x H identity: log H."""
    p, has_spectrum = _channel_spectra(features)
    return _mean_over_channels(-p[..., 0].log(), has_spectrum)



class BridgeFeatures:
    """While open, keeps the LLM bridge's input ("before") and output ("after"), (B, C, h, w) float32,
    of the latest forward pass: the tensors the module docstring names."""

    def __init__(self, bridge: torch.nn.Module):
        self.bridge = bridge
        self.before = self.after = None

    def __enter__(self):
        self.hook = self.bridge.register_forward_hook(self.record)
        return self

    def __exit__(self, *exc):
        self.hook.remove()

    def record(self, module, inputs, output):
        self.before, self.after = inputs[0].detach().float(), output.detach().float()


def feature_analysis(features: BridgeFeatures, masks: Tensor) -> dict[str, Tensor]:
    """The bridge's features of the latest batch and its masks (B, 1, H, W) -> per image (B,) values
    "<concentration_iou|effective_rank|lsvr>_<before|after>"."""
    results = {}
    for when, tensor in (("before", features.before), ("after", features.after)):
        activation = upsample_map(activation_map(tensor), masks.shape[-2:])  # (B, H, W)
        results[f"concentration_iou_{when}"] = concentration_iou(activation, masks)
        results[f"effective_rank_{when}"] = effective_rank(tensor)
        results[f"lsvr_{when}"] = lsvr(tensor)
    return results
