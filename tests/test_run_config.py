"""Tests of run_config.RunConfig: the one typed record of a run's settings that train.py's flags fill, the
recipes complete, config.json is written from and read back into, for runs of every earlier version."""
import json
from dataclasses import asdict, fields

import train
from llm4seg.run_config import RunConfig
from llm4seg.settings import RECIPES, make_parser, parse_args
from llm4seg.task import Task

# config.json's "train" as a run of December 2025 wrote it: before --multiclass, --roi-size, --split-file,
# --test-fraction and --val-every existed, and with a key this version no longer has.
EARLIER_RUN = {"data": "synthetic", "data_dir": None, "synthetic_size": 10, "fold": None, "label": None,
               "backbone": "cmunext", "llm": "none", "layer": 15, "mode": "frozen", "lora_rank": 0,
               "mapper_lora_rank": 0, "residual": None, "final_norm": None, "patch_size": 8, "embed_dim": 64,
               "depth": 16, "heads": 4, "dropout": 0.2, "recipe": "llm4seg", "optimizer": "sgd", "epochs": 2,
               "lr": 0.01, "schedule": "poly", "momentum": 0.9, "weight_decay": 0.0001, "bce_weight": 0.5,
               "img_size": 32, "seed": 41, "device": "cpu", "batch_size": 4, "workers": 0, "precision": "fp32",
               "compile": None, "out": "runs/old", "resume": None, "init_from": None, "stop_after_epoch": None,
               "amp": False}


def test_the_parser_fills_every_field_and_takes_its_defaults_from_them():
    """One flag per field, named alike, and the defaults defined once: RunConfig's."""
    parser = make_parser()
    defaults = vars(parser.parse_args([]))
    assert defaults == asdict(RunConfig())
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    assert flags == {field.name for field in fields(RunConfig)}


def test_a_recipe_presets_the_fields_left_none_and_a_given_flag_wins():
    config = parse_args(["--recipe", "medvisionllama", "--lr", "0.1", "--llm", "none"])
    assert isinstance(config, RunConfig) and config.lr == 0.1
    preset = {**RECIPES["medvisionllama"], "mapper_lora_rank": 0}  # a plain backbone has no mappers
    assert {name: getattr(config, name) for name in preset if name != "lr"} == \
        {name: value for name, value in preset.items() if name != "lr"}
    assert config.img_size == 256 and parse_args(["--data", "synthetic3d", "--backbone", "vit"]).img_size == 128


def test_config_json_round_trips_and_a_run_of_an_earlier_version_still_loads():
    config = parse_args(["--data", "synthetic-organs", "--backbone", "mednext-tiny", "--roi-size", "32"])
    assert RunConfig.from_saved(json.loads(json.dumps(asdict(config)))) == config
    earlier = RunConfig.from_saved(EARLIER_RUN)  # the key no field has ("amp") is left out
    assert (earlier.multiclass, earlier.roi_size, earlier.split_file, earlier.test_fraction) == (False, 96, None, None)
    assert earlier.epochs == 2 and earlier.val_every is None  # resolved as that run was: every epoch
    task = Task.of_run({"train": EARLIER_RUN, "model": {"num_classes": 1}})  # and a model saved before 3D
    assert (task.spatial_dims, task.roi_size, task.class_names) == (2, None, ("background", "foreground"))


def test_resume_continues_a_run_written_before_flags_existed(tmp_path, capsys):
    """A run whose config.json predates --val-every, --roi-size, ... is resumed with its own settings."""
    out = tmp_path / "run"
    argv = ["--data", "synthetic", "--synthetic-size", "10", "--img-size", "32", "--llm", "none", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--out", str(out)]
    assert train.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    config["train"] = {**EARLIER_RUN, "out": str(out), "epochs": 2}
    (out / "config.json").write_text(json.dumps(config))
    assert train.main(["--resume", str(out)]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert train.main(["--resume", str(out), "--lr", "0.5"]) == 2  # another value: one line, exit 2
    assert "expected --lr 0.01 or no --lr, got 0.5" in capsys.readouterr().err
