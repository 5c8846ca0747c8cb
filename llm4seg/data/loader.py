"""train.py's training loader: workers that live across epochs. Keys are (index, epoch) pairs, so each
item's augmentation follows its epoch whatever copy of the dataset a worker holds."""
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .images.cache import SegmentationFiles


class EpochOrder(Sampler):
    """The training order as (index, epoch) keys: `order`'s indices (a DistributedSampler) for the epoch that
    start(epoch, skip) set, less the first `skip` (trained before a resume). A DataLoader worker that lives
    across epochs (persistent_workers) keeps the copy of the dataset it started with, so an epoch set on the
    main process's dataset would never reach it; each key carries its epoch instead, to EpochItems."""

    def __init__(self, order: DistributedSampler):
        self.order, self.epoch, self.skip = order, 0, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.order.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        epoch = self.epoch  # bound now: the DataLoader draws keys ahead, while the epoch runs
        return iter([(index, epoch) for index in list(self.order)[self.skip:]])

    def __len__(self) -> int:
        return max(len(self.order) - self.skip, 0)


class EpochItems(Dataset):
    """A dataset read by (index, epoch) keys (EpochOrder): its `epoch` set in this process's copy, then item
    `index`. raw: a 2D dataset read from files gives raw_item's uint8 images for normalize_batch on the device;
    the others (generated, volumes) give their items as they are."""

    def __init__(self, dataset: Dataset, raw: bool = True):
        self.dataset, self.raw = dataset, raw  # raw=False: every item as dataset[index] gives it

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        self.dataset.epoch = epoch
        if self.raw and isinstance(self.dataset, SegmentationFiles):
            return self.dataset.raw_item(index)
        return self.dataset[index]
