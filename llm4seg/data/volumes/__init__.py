"""3D data: the datasets of volumes that data.load_dataset serves from files, one module each. In reading order:

    msd.py        any Medical Segmentation Decathlon task as shipped (MedVisionLlama): binary, or multiclass
    btcv.py       BTCV abdomen CT (LLM4Seg's Table 2), both layouts, UNETR's preprocessing, each case's original
                  grid (BTCVVolumes.original_grid(index)) and the way back to it (to_original_grid)
    patches.py    the training split of btcv / synthetic-organs: random R^3 patches, pos / neg centred
    nifti.py      what the file-backed ones share: NIfTI reading into clear errors, the checksummed cache (its
                  stamp and checksum are data/cases.py's, which the 2D cache shares)

Items (the volume datasets' contract with train.py, eval.py and metrics.py; the generated volumes of
synthetic3d and synthetic-organs, data/generated.py, give the same):
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
from .msd import MSDVolumes, msd_cases, msd_labels
from .nifti import read_cached, read_nifti, resize_volume
from .patches import RandomPatches

__all__ = ["BTCV_CLASSES", "BTCV_TRAIN", "BTCV_VAL", "TARGET_SPACING", "BTCVFolder", "BTCVVolumes", "find_btcv",
           "read_btcv_case", "to_original_grid", "MSDVolumes", "msd_cases", "msd_labels", "read_cached",
           "read_nifti", "resize_volume", "RandomPatches"]
