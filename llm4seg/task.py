"""The kind of run, decided once: from the data and the model at the start of a run, or from a run's
config.json. Training, evaluation, prediction and the pictures ask a Task instead of testing the number of
classes, the spatial rank or a tensor's shape themselves.

                  binary (num_classes 1)                     multi-class (num_classes K > 1)
    logits        (B, 1, *S)                                 (B, K, *S)
    loss          w BCE + (1 - soft Dice)  (losses.py)       CE + (1 - soft Dice) over softmax (MONAI's DiceCELoss)
    probabilities sigmoid(z)                                 softmax(z) over the K channels
    labels        p > THRESHOLD (0.5)                        argmax over the K channels
    metrics       per image (metrics.segmentation_metrics,   per class, averaged over the classes a case holds
                  HD95, NSD), pooled IoU / Dice              (metrics.class_metrics)
    panels        contours of truth and prediction           each class in its colour, with a key

                  images (spatial_dims 2)                    volumes (spatial_dims 3)
    distances     pixels                                     millimetres (each volume's voxel spacing)
    panels        one row                                    an axial, a coronal and a sagittal row
    inference     whole inputs (B, C, H, W) at once          whole inputs, or with roi_size (runs trained on
                                                             crops) sliding windows of roi_size^3 over each volume

S = (H, W) or (D, H, W). class_names holds the K names, background first; a binary run's are
("background", "foreground").
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import losses
from .data import PATCH_DATASETS, class_names
from .files import InputError
from .metrics import OVERLAP_METRICS, SEGMENTATION_METRICS, SURFACE_METRICS, THRESHOLD
from .pictures import label_panel_png, panel_png, to_rgb, volume_panel_png
from .run_config import RunConfig

BINARY_NAMES = ("background", "foreground")


@dataclass(frozen=True)
class Task:
    num_classes: int                 # 1: binary, one logit; K > 1: K logits, one per class
    spatial_dims: int                # 2: images; 3: volumes
    class_names: tuple[str, ...]     # K names (2 when binary), background first
    roi_size: int | None = None      # whole inputs through sliding windows of this side; None: at once

    @classmethod
    def of(cls, settings: RunConfig, num_classes: int, spatial_dims: int, data_dir: str | None = None, *,
           number_unknown: bool = False) -> "Task":
        """The task of a run with these settings and a model of num_classes outputs in spatial_dims. The class
        names are the data's (data.class_names, reading data_dir, else the run's data folder, where the names are
        in a file); with number_unknown, where that folder is not (predicting on another machine), the classes
        are numbered instead of the error."""
        names = BINARY_NAMES
        if num_classes > 1:
            try:
                names = class_names(settings.data, data_dir or settings.data_dir, multiclass=settings.multiclass)
            except (FileNotFoundError, InputError) as error:
                if not number_unknown:
                    raise
                print(f"the class names are unknown ({error}); they are numbered (--data-dir names the folder that "
                      "holds them, e.g. an MSD task's dataset.json)")
                names = ["background", *(f"class {k}" for k in range(1, num_classes))]
        roi_size = settings.roi_size if settings.data in PATCH_DATASETS else None
        return cls(num_classes, spatial_dims, tuple(names), roi_size)

    @classmethod
    def of_run(cls, config: dict, data_dir: str | None = None, *, number_unknown: bool = False) -> "Task":
        """The task of a run from its config.json (checkpoints.read_run_config / load_run): its "train" settings
        (RunConfig.from_saved) and "model" (a run saved before volumes existed is 2D)."""
        model = config["model"]
        return cls.of(RunConfig.from_saved(config["train"]), model["num_classes"], model.get("spatial_dims", 2),
                      data_dir, number_unknown=number_unknown)

    @property
    def multiclass(self) -> bool:
        return self.num_classes > 1

    @property
    def volumes(self) -> bool:
        return self.spatial_dims == 3

    @property
    def distance_unit(self) -> str:
        """HD95's and the NSD tolerance's unit: volumes carry their voxel spacing, images do not."""
        return "mm" if self.volumes else "px"

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """What train.py validates by (the best checkpoint: the highest "iou")."""
        return OVERLAP_METRICS if self.multiclass else SEGMENTATION_METRICS

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        """What eval.py reports per case: multi-class, the means over the classes; binary, every metric."""
        return self.validation_metrics + SURFACE_METRICS

    @property
    def label_dtype(self) -> torch.dtype:
        """What label maps on disk hold: uint8, int16 beyond 256 classes."""
        return torch.uint8 if self.num_classes <= 256 else torch.int16

    @property
    def label_dtype_numpy(self) -> np.dtype:
        """label_dtype as numpy's, for the label maps written as NIfTI."""
        return np.dtype(np.uint8) if self.label_dtype == torch.uint8 else np.dtype(np.int16)

    def loss(self, logits: Tensor, target: Tensor, bce_weight: float) -> Tensor:
        """logits (B, K, *S) float32; target (B, 1, *S): a {0, 1} mask (binary) or a label map."""
        if self.multiclass:
            return losses.dice_ce_loss(logits, target)
        return losses.bce_dice_loss(logits, target.float(), bce_weight)

    def probabilities(self, logits: Tensor) -> Tensor:
        """(B, K, *S) logits -> (B, K, *S) probabilities."""
        return torch.softmax(logits, dim=1) if self.multiclass else torch.sigmoid(logits)

    def labels(self, probabilities: Tensor) -> Tensor:
        """(B, K, *S) probabilities -> (B, *S) labels: the argmax (int64), or the foreground (bool)."""
        return probabilities.argmax(1) if self.multiclass else probabilities[:, 0] > THRESHOLD

    def panel_png(self, image: Tensor, truth: Tensor, prediction: Tensor, path: Path, caption: str) -> None:
        """One case's picture: image (C, *S) as the network read it, its truth (*S) and predicted labels (*S,
        task.labels); pictures.py draws it."""
        names = list(self.class_names) if self.multiclass else None
        if self.volumes:
            volume_panel_png(image, truth, prediction, path, multiclass=self.multiclass, caption=caption,
                             class_names=names)
        elif self.multiclass:
            label_panel_png(to_rgb(image), truth, prediction, path, caption=caption, class_names=names)
        else:
            panel_png(to_rgb(image), truth, prediction, path, caption=caption)

    def legend(self) -> dict[str, str]:
        """{label value: class name}, written beside label maps (label_legend.json)."""
        return {str(value): name for value, name in enumerate(self.class_names)}


