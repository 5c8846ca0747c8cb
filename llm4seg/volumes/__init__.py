"""3D data: the datasets of volumes that data.load_dataset serves, one module each.

    msd.py        any Medical Segmentation Decathlon task as shipped (MedVisionLlama): binary, or multiclass
    btcv.py       BTCV abdomen CT (LLM4Seg's Table 2), both layouts, UNETR's preprocessing, each case's original
                  grid (BTCVVolumes.original_grid(index)) and the way back to it (to_original_grid)
    generated.py  volumes from (seed, index) alone: synthetic3d's blobs, synthetic-organs' abdomen
    patches.py    the training split of btcv / synthetic-organs: random R^3 patches, pos / neg centred
    nifti.py      what the file-backed ones share: NIfTI reading into clear errors, the checksummed cache

Items (the volume datasets' contract with train.py, eval.py and metrics.py):
    binary (msd, synthetic3d)   {"image": (C, S, S, S) float32, "mask": (1, S, S, S) float32 in {0, 1},
                                 "name": case id, "spacing": (3,) float64 mm}
    multiclass (btcv, synthetic-organs, msd multiclass)
                                {"image": (C, *shape) float32, "mask": (1, *shape) int64 in 0..K-1, "name",
                                 "spacing": (3,) float64 mm}; shape = R^3 patches in btcv's and synthetic-organs'
                                 training split, whole volumes otherwise (btcv's differ between cases)
Each module's docstring states its layout, preprocessing and checks.
"""
from .btcv import (BTCV_CLASSES, BTCV_TRAIN, BTCV_VAL, TARGET_SPACING, BTCVFolder, BTCVVolumes, find_btcv,
                   read_btcv_case, to_original_grid)
from .generated import ORGAN_CLASSES, ORGAN_SPACING, SyntheticOrgans, draw_blob_volume, draw_organ_volume
from .msd import MSDVolumes, msd_cases, msd_labels
from .nifti import read_cached, read_nifti, resize_volume, tensors_crc32
from .patches import RandomPatches

__all__ = ["BTCV_CLASSES", "BTCV_TRAIN", "BTCV_VAL", "TARGET_SPACING", "BTCVFolder", "BTCVVolumes", "find_btcv",
           "read_btcv_case", "to_original_grid", "ORGAN_CLASSES", "ORGAN_SPACING", "SyntheticOrgans",
           "draw_blob_volume", "draw_organ_volume", "MSDVolumes", "msd_cases", "msd_labels", "read_cached",
           "read_nifti", "resize_volume", "tensors_crc32", "RandomPatches"]
