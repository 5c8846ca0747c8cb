"""A run directory's files: checkpoints, RNG states, and rebuilding the model a run trained.

    RUN_DIR/config.json         every setting, the model config build_model needs, the LLM layer's
                                source and commit (written by train.py)
    RUN_DIR/<name>.safetensors  the model's state_dict as "model.*" (a frozen LLM layer is not in
                                it: it is fetched again) and SGD's momentum buffers "optimizer.*"
    RUN_DIR/<name>.json         the rest: epoch, step, optimizer settings, every rank's RNG states
    RUN_DIR/metrics.jsonl       one line per epoch (train.py appends; a resume drops lines past `last`)

Both halves carry the global step, so a kill between their two renames is found on load. No
pickle anywhere: tensors in safetensors, the rest in JSON (RNG states as base64 byte arrays).
train.py (saving, --resume) and eval.py (load_run) both read runs through this module.
"""
import base64
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from files import write_atomically
from model import build_model


def save_checkpoint(run_dir: Path, name: str, net: torch.nn.Module, info: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """<name>.safetensors (tensors) then <name>.json (the rest); both carry the global step so a
    crash between the two renames is detected on load."""
    tensors = {f"model.{key}": value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    info = dict(info)
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                assert torch.is_tensor(value), f"optimizer state {key} is not a tensor"
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        info["optimizer_param_groups"] = optimizer_state["param_groups"]
    step = {"global_step": str(info["global_step"])}
    write_atomically(run_dir / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=step))
    write_atomically(run_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1)))


def load_checkpoint(run_dir: Path, name: str, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load <name> into net (and optimizer); return the JSON part."""
    info = json.loads((run_dir / f"{name}.json").read_text())
    tensor_file = run_dir / f"{name}.safetensors"
    with safe_open(tensor_file, framework="pt") as f:
        if f.metadata().get("global_step") != str(info["global_step"]):
            raise ValueError(f"{tensor_file} (step {f.metadata().get('global_step')}) and {name}.json "
                             f"(step {info['global_step']}) disagree: the run was killed while saving; "
                             f"expected matching files")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, state_name = key.split(".", 2)
                state.setdefault(int(index), {})[state_name] = value
        optimizer.load_state_dict({"state": state, "param_groups": info["optimizer_param_groups"]})
    return info


def keep_metrics_up_to(path: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs after the checkpoint (written before a crash), so a resumed
    run logs each epoch exactly once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epochs_done]
    if len(kept) != len(lines):
        write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


# ----------------------------------------------------------------------------------------------
# RNG states, JSON-ready


def rng_state() -> dict:
    """This process's RNG states, JSON-ready: byte arrays as base64."""
    numpy_name, numpy_keys, *numpy_rest = np.random.get_state()
    python_version, python_words, python_gauss = random.getstate()
    return {
        "torch": _to_base64(torch.get_rng_state().numpy()),
        "cuda": [_to_base64(s.numpy()) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [numpy_name, _to_base64(numpy_keys.astype(np.uint32)), *numpy_rest],
        "python": [python_version, _to_base64(np.array(python_words, dtype=np.uint64)), python_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.from_numpy(_from_base64(state["torch"], np.uint8)))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.from_numpy(_from_base64(s, np.uint8)) for s in state["cuda"]])
    numpy_name, numpy_keys, *numpy_rest = state["numpy"]
    np.random.set_state((numpy_name, _from_base64(numpy_keys, np.uint32), *numpy_rest))
    python_version, python_words, python_gauss = state["python"]
    random.setstate((python_version, tuple(_from_base64(python_words, np.uint64).tolist()), python_gauss))


def _to_base64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _from_base64(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


# ----------------------------------------------------------------------------------------------
# A run's model, rebuilt


def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json as train.py wrote it: {"train": settings, "model": build_model kwargs, "llm_layer", ...}."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        found = "no config.json in it" if run_dir.is_dir() else "no such directory"
        raise FileNotFoundError(f"{run_dir}: expected a run directory written by train.py (with config.json), "
                                f"found {found}")
    return json.loads(config_file.read_text())


def rebuild_model(config: dict) -> torch.nn.Module:
    """The model of a run's config.json, its LLM layer pinned to the commit the run trained with:
    the layer is in no checkpoint, so it is read again and must be the same weights."""
    trained_commit = (config["llm_layer"] or {}).get("commit")
    net = build_model(**config["model"] | {"revision": trained_commit})
    if net.bridge is not None and net.bridge.layer.config.commit != trained_commit:
        raise ValueError(f"the run trained with {config['model']['llm']} at commit {trained_commit}, but commit "
                         f"{net.bridge.layer.config.commit} was loaded; expected the same weights (the layer "
                         f"is not in the checkpoint)")
    return net


def load_run(run_dir, checkpoint: str = "best") -> tuple[torch.nn.Module, dict, dict]:
    """A run of train.py -> (model in eval mode on the CPU, its config.json, the checkpoint's JSON part).

    The model is rebuilt from config["model"]. A frozen LLM layer, which no checkpoint holds, is read again
    from where the run found it (a local directory, or the local Hub cache) and must be the same commit."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    for name in (f"{checkpoint}.safetensors", f"{checkpoint}.json"):
        if not (run_dir / name).is_file():
            other = "last" if checkpoint == "best" else "best"
            raise FileNotFoundError(f"{run_dir / name} not found: expected the '{checkpoint}' checkpoint, which "
                                    f"train.py writes at the end of each epoch; let the run finish an epoch, "
                                    f"or try --checkpoint {other}")
    net = rebuild_model(config)
    info = load_checkpoint(run_dir, checkpoint, net)
    return net.eval(), config, info
