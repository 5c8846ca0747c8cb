"""One training run's settings, typed: what train.py's flags fill (settings.make_parser takes its defaults from
here), what a recipe presets (settings.RECIPES), what config.json's "train" section is written from and read back
into. One field per flag, named as the flag (--img-size: img_size).

    config = RunConfig(**vars(parser.parse_args(argv)))     the command line
    config = settings.resolve_defaults(config)              the fields left None: the recipe's, the data's size
    asdict(config)                                          config.json's "train"
    RunConfig.from_saved(config_json["train"])              back, from a run of any earlier version

The defaults live here: the data's and the model's are load_dataset's and build_model's own (a library user and
train.py get the same run), the ViT's shape its BACKBONES row's. A field whose default is None is resolved by
settings.resolve_defaults: the recipe's optimizer, lr, schedule, weight decay, loss weight, batch size, epochs,
validation interval and mapper LoRA rank, the image size of the data's dimension; the model's residual and
final_norm stay None, which build_model resolves per backbone. A saved run lacks the fields added after it was
trained: each takes its default, which is what such a run did (multiclass False, roi_size 96, no split file, ...).
"""
from dataclasses import asdict, dataclass, fields

from .cli import RUNTIME_DEFAULTS, defaults_of
from .data import PATCH_DATASETS, load_dataset
from .model import VIT_OPTIONS, build_model

MODEL_DEFAULTS, DATA_DEFAULTS = defaults_of(build_model), defaults_of(load_dataset)


@dataclass
class RunConfig:
    # the data (load_dataset)
    data: str = "kvasir"
    data_dir: str | None = None               # None: $LLM4SEG_DATA/<data>, or ./data/<data>
    synthetic_size: int = DATA_DEFAULTS["synthetic_size"]
    fold: int | None = None
    test_fraction: float | None = None        # None: the dataset's own
    split_file: str | None = None             # None: a file beside the data (btcv: the official split)
    label: int | None = None                  # msd: None = every label > 0 is foreground
    multiclass: bool = False
    roi_size: int = DATA_DEFAULTS["roi_size"]
    img_size: int | None = None               # None: 256 px images, 128^3 volumes
    seed: int = DATA_DEFAULTS["seed"]
    # the model (build_model)
    backbone: str = MODEL_DEFAULTS["backbone"]
    llm: str = MODEL_DEFAULTS["llm"]          # "none": the plain backbone
    layer: int = MODEL_DEFAULTS["layer"]
    mode: str = MODEL_DEFAULTS["mode"]
    lora_rank: int = MODEL_DEFAULTS["lora_rank"]
    mapper_lora_rank: int | None = None       # None: the recipe's
    residual: bool | None = None              # None: the backbone's
    final_norm: str | None = None             # None: the backbone's
    patch_size: int = VIT_OPTIONS["patch_size"]
    embed_dim: int = VIT_OPTIONS["embed_dim"]
    depth: int = VIT_OPTIONS["depth"]
    heads: int = VIT_OPTIONS["heads"]
    dropout: float = VIT_OPTIONS["dropout"]
    # the recipe (None: the recipe's)
    recipe: str = "llm4seg"
    optimizer: str | None = None
    epochs: int | None = None
    lr: float | None = None
    schedule: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    bce_weight: float | None = None
    val_every: int | None = None
    batch_size: int | None = None
    # the run
    device: str = RUNTIME_DEFAULTS["device"]
    workers: int | None = RUNTIME_DEFAULTS["workers"]  # None: min(4, the usable cores)
    precision: str = RUNTIME_DEFAULTS["precision"]
    compile: bool | None = None               # None: on CUDA only
    out: str | None = None                    # None: runs/<a name from the settings>
    resume: str | None = None
    init_from: str | None = None
    stop_after_epoch: int | None = None

    @classmethod
    def from_saved(cls, saved: dict) -> "RunConfig":
        """config.json's "train" -> RunConfig; the fields it lacks (added after the run) take their defaults,
        and keys no field has are left out."""
        known = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in saved.items() if name in known})

    @property
    def plain(self) -> bool:
        """No LLM layer: the plain backbone, the papers' baseline rows."""
        return self.llm == "none" or self.mode == "none"

    @property
    def input_side(self) -> tuple[str, int]:
        """(its flag, the side) of what the network trains on: the crops of a patch-trained dataset, else the
        images (or volumes)."""
        return ("--roi-size", self.roi_size) if self.data in PATCH_DATASETS else ("--img-size", self.img_size)

    def data_options(self) -> dict:
        """The load_dataset keywords beyond (name, root, split, img_size, seed)."""
        return {"synthetic_size": self.synthetic_size, "fold": self.fold, "label": self.label,
                "multiclass": self.multiclass, "roi_size": self.roi_size, "test_fraction": self.test_fraction,
                "split_file": self.split_file}


def run_config_defaults() -> dict:
    """{field: default}: the parser's defaults."""
    return asdict(RunConfig())
