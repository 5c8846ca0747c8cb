"""The segmentation losses of the papers' recipes (settings.RECIPES), on logits of any spatial rank; the run's
Task (task.py) picks one: bce_dice_loss for one output channel, dice_ce_loss for K > 1.

    bce_dice_loss(logits, target, w)       w BCE + (1 - soft Dice), LLM4Seg's (w 0.5) and MedVisionLlama's (w 1)
    dice_ce_loss(logits, labels)           CE + (1 - soft Dice) over softmax: MONAI's DiceCELoss(to_onehot_y=True,
                                           softmax=True), the BTCV loss of UNETR and 3D UX-Net
Soft Dice per case (and class), smoothed by DICE_SMOOTH in numerator and denominator, averaged.
"""
import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, K, *spatial), labels (B, 1, *spatial) in 0..K-1 -> scalar CE + (1 - soft Dice), MONAI's
    DiceCELoss(to_onehot_y=True, softmax=True) (UNETR's and 3D UX-Net's BTCV loss):
        CE = mean over voxels of -log softmax(z)_y
        Dice_bk = (2 sum(p_k g_k) + 1e-5) / (sum p_k + sum g_k + 1e-5)  per case b and class k, background
        included; loss = CE + 1 - mean_bk Dice_bk."""
    labels = labels[:, 0].long()                                                   # (B, *spatial)
    cross_entropy = F.cross_entropy(logits, labels)
    probability = torch.softmax(logits, dim=1).flatten(2)                          # (B, K, N)
    truth = F.one_hot(labels.flatten(1), logits.shape[1]).transpose(1, 2).to(probability.dtype)  # (B, K, N)
    dice = (2 * (probability * truth).sum(2) + DICE_SMOOTH) / (
        probability.sum(2) + truth.sum(2) + DICE_SMOOTH)                           # (B, K)
    return cross_entropy + 1 - dice.mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.5) -> torch.Tensor:
    """logits, target (B, 1, *spatial) -> scalar bce_weight * BCE + (1 - soft Dice averaged over the batch)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability, target = torch.sigmoid(logits).flatten(1), target.flatten(1)    # (B, N)
    dice = (2 * (probability * target).sum(1) + DICE_SMOOTH) / (
        probability.sum(1) + target.sum(1) + DICE_SMOOTH)                          # (B,)
    return bce_weight * bce + (1 - dice.mean())
