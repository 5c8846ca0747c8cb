"""A run directory's files: checkpoints, RNG states, and rebuilding the model a run trained.

    RUN_DIR/config.json         every setting, the model config build_model needs, the LLM layer's
                                source and commit, or for a local folder / GGUF file its fingerprint
                                (size, mtime and sha256 of the layer's bytes; written by train.py)
    RUN_DIR/<name>.safetensors  one checkpoint, one file: the model's state_dict as "model.*" (a frozen
                                LLM layer is not in it: it is read again) and the optimizer's state
                                "optimizer.*"; its metadata holds "info" (JSON: epoch, step, optimizer
                                settings, every rank's RNG states) and "sha256" of the tensors and info
    RUN_DIR/metrics.jsonl       one line per epoch (train.py rewrites it; a resume drops lines past `last`)
    RUN_DIR/.lock               held (an advisory flock) by the train.py writing the run, for its whole life
                                (run_dir_lock): a second train.py into the same directory is refused

Saving and loading hold a checkpoint's bytes in memory beside its tensors (twice its size; small unless a
layer is trained with Adam). One rename makes a checkpoint visible (files.write_atomically, fsync'd), so at every instant `last` is
either the previous checkpoint or the new one, whole. Ctrl-C and SIGTERM wait until the file is written
(runtime.signals_deferred). A full disk leaves the previous file as it was and raises files.WriteError.
Loading checks the sha256 of tensors and info, so flipped bytes are refused, not evaluated; a truncated or damaged
file is a files.InputError naming it. Runs written before this format (<name>.safetensors with the info
beside it in <name>.json, both carrying the global step) still load and resume.
No pickle anywhere: tensors in safetensors, the rest in JSON (RNG states as base64 byte arrays).
train.py (saving, --resume) and eval.py (load_run) both read runs through this module.
"""
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .files import InputError, WriteError, write_atomically, write_text
from .llm_layer import check_fingerprint
from .model import build_model
from .runtime import signals_deferred


def save_checkpoint(run_dir: Path, name: str, net: torch.nn.Module, info: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """RUN_DIR/<name>.safetensors: the tensors, with `info` (JSON) and their sha256 in its metadata,
    written whole or not at all."""
    tensors = {f"model.{key}": value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    info = dict(info)
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                assert torch.is_tensor(value), f"optimizer state {key} is not a tensor"
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        info["optimizer_param_groups"] = optimizer_state["param_groups"]
    info_text = json.dumps(info)
    data = save_safetensors(tensors, metadata={"info": info_text, "sha256": checkpoint_sha256(tensors, info_text)})
    path = run_dir / f"{name}.safetensors"
    try:
        with signals_deferred():
            write_atomically(path, lambda temporary: temporary.write_bytes(data))
    except WriteError as error:
        raise WriteError(error.errno, f"{os.strerror(error.errno)} writing {path} ({len(data):,} bytes); "
                                      f"{previous_checkpoint(path)}") from error
    # The info of the format before this one: superseded now, and stale (the new file carries its own).
    (run_dir / f"{name}.json").unlink(missing_ok=True)


def previous_checkpoint(path: Path) -> str:
    """What a failed save left in place, for its error message."""
    if not path.is_file():
        return "no earlier checkpoint exists there"
    try:
        info = checkpoint_info(path.parent, path.stem)
    except (InputError, OSError):
        return "the file there is the previous one, unchanged"
    epoch = info.get("epoch", info.get("progress", {}).get("epochs_done"))
    return f"the previous checkpoint (epoch {epoch}, step {info['global_step']}) is intact"


def checkpoint_sha256(tensors: dict[str, torch.Tensor], info_text: str) -> str:
    """sha256 over the info's JSON text and every tensor in name order: its name, dtype, shape and bytes."""
    digest = hashlib.sha256(info_text.encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the hidden temporaries (files.write_atomically's `.<name>.<pid>.tmp`) that a killed process
    left in a run directory: a kill -9 mid-write leaves one, as large as a checkpoint. Only those whose
    process is gone; returns them."""
    removed = []
    for temporary in Path(run_dir).glob(".*.*.tmp"):
        pid = temporary.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold RUN_DIR/.lock while the block runs (the directory is created if need be). Two train.py into one
    --out would each finish and print "done", one's checkpoints silently replaced by the other's and
    metrics.jsonl interleaving both: the second is refused here, in one line naming the first's pid. The lock
    is the kernel's (flock), dropped when its process ends however it ends (kill -9 included; its DataLoader
    workers, forked with the descriptor, hold it the few seconds until they notice), so a lock a dead process
    left is simply taken. The file stays: unlinking it would let a third process lock a new file while
    a second holds the old one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{run_dir} is in use by another train.py (pid {holder}): wait for it to end, or "
                             "pick another --out") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def has_checkpoint(run_dir: Path, name: str) -> bool:
    return (Path(run_dir) / f"{name}.safetensors").is_file()


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a checkpoint file, verified: a files.InputError names the file when it is
    truncated, damaged, or its tensors are not the ones saved."""
    data = path.read_bytes()
    metadata = safetensors_metadata(data, path)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # the Rust parser's SafetensorError and friends: any of them means damaged
        raise InputError(f"checkpoint {path} is damaged ({error}); expected a file train.py wrote whole: "
                         f"use the other checkpoint (best / last) or train again") from None
    if "info" in metadata and checkpoint_sha256(tensors, metadata["info"]) != metadata.get("sha256"):
        raise InputError(f"checkpoint {path} is corrupt: the sha256 of its tensors and info differs from the one "
                         f"saved with them (flipped bytes on the disk or in a copy); use the other checkpoint "
                         f"(best / last) or train again")
    return tensors, info_of(path, metadata)


def checkpoint_info(run_dir: Path, name: str) -> dict:
    """The info of RUN_DIR/<name>.safetensors from its header alone: for listing runs (sweep.py), not
    for loading (the tensors are not verified)."""
    path = Path(run_dir) / f"{name}.safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        head += f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
    return info_of(path, safetensors_metadata(head, path))


def info_of(path: Path, metadata: dict) -> dict:
    """A checkpoint's info: in its metadata, or in <name>.json beside it (the earlier two-file format)."""
    if "info" in metadata:
        info = parse_json(metadata["info"], f"the info in {path}")
    else:
        info = legacy_info(path, metadata)
    if not isinstance(info, dict) or "global_step" not in info:
        raise InputError(f"the info of checkpoint {path} lacks its global step; expected a file train.py wrote")
    return info


def safetensors_metadata(data: bytes, path: Path) -> dict:
    """The "__metadata__" of a safetensors file's header, or an InputError naming the file."""
    header_length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + header_length > len(data):
        raise InputError(f"checkpoint {path} is truncated ({len(data):,} bytes; its header alone needs "
                         f"{8 + header_length:,}): a copy was cut short; use the other checkpoint or train again")
    header = parse_json(data[8:8 + header_length], f"the header of checkpoint {path}")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise InputError(f"the header of checkpoint {path} is not a safetensors header; expected a JSON object")
    return metadata


def legacy_info(path: Path, metadata: dict) -> dict:
    """The info of a checkpoint in the earlier two-file format, from <name>.json beside it."""
    info_file = path.with_suffix(".json")
    if not info_file.is_file():
        raise InputError(f"checkpoint {path} holds no info and {info_file.name} is missing; expected a file "
                         "train.py wrote")
    info = parse_json(info_file.read_bytes(), f"checkpoint info {info_file}")
    if not isinstance(info, dict) or metadata.get("global_step") != str(info.get("global_step")):
        raise InputError(f"{path} (step {metadata.get('global_step')}) and {info_file.name} (step "
                         f"{info.get('global_step') if isinstance(info, dict) else '?'}) disagree: the run was "
                         f"killed while saving; expected matching files")
    return info


def parse_json(text: bytes | str, what: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{what} is not valid JSON ({error}): the file is truncated or damaged") from None


def load_checkpoint(run_dir: Path, name: str, net: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load <name> into net (and optimizer), verified; return its info."""
    path = Path(run_dir) / f"{name}.safetensors"
    tensors, info = read_checkpoint(path)
    try:
        net.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        if optimizer is not None:
            state = {}
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, index, state_name = key.split(".", 2)
                    state.setdefault(int(index), {})[state_name] = value
            optimizer.load_state_dict({"state": state, "param_groups": info["optimizer_param_groups"]})
    except (RuntimeError, KeyError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"checkpoint {path} does not fit the model of {Path(run_dir) / 'config.json'} "
                         f"({first_line}); expected the checkpoint of this run") from None
    return info


def keep_metrics_up_to(path: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs after the checkpoint (written before a crash), so a resumed
    run logs each epoch exactly once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if parse_json(line, f"a line of {path}")["epoch"] <= epochs_done]
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


def write_run_config(run_dir: Path, settings: dict, net: torch.nn.Module, world_size: int, train_images: int,
                     val_images: int, iterations: int) -> None:
    """RUN_DIR/config.json: every setting and what eval.py needs to rebuild the model (read_run_config)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    layer = net.bridge.layer.config if net.bridge is not None else None
    config = {
        "train": settings,
        "model": asdict(net.config),
        "llm_layer": layer.to_dict() if layer else None,
        "world_size": world_size,
        "global_batch_size": world_size * settings["batch_size"],
        "train_images": train_images, "val_images": val_images,
        "iterations_per_epoch": iterations,
        "torch": torch.__version__,
    }
    write_text(run_dir / "config.json", json.dumps(config, indent=1))


def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json as train.py wrote it: {"train": settings, "model": build_model kwargs, "llm_layer", ...}."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        found = "no config.json in it" if run_dir.is_dir() else "no such directory"
        raise FileNotFoundError(f"{run_dir}: expected a run directory written by train.py (with config.json), "
                                f"found {found}")
    config = parse_json(config_file.read_bytes(), f"the run's settings {config_file}")
    if not isinstance(config, dict) or not {"train", "model", "llm_layer"} <= config.keys():
        raise InputError(f"{config_file} lacks the sections train.py writes (train, model, llm_layer); expected "
                         "the config.json of a run")
    return config


def rebuild_model(config: dict) -> torch.nn.Module:
    """The model of a run's config.json, its LLM layer pinned to the commit the run trained with (Hub), or
    checked against the fingerprint of the file it was read from (local folder, GGUF): the layer is in no
    checkpoint, so it is read again and must be the same weights."""
    net = build_model(**config["model"] | {"revision": (config["llm_layer"] or {}).get("commit")})
    check_same_layer(config, net)
    return net


def check_same_layer(config: dict, net: torch.nn.Module) -> None:
    """net's LLM layer has the weights the run of `config` trained with: the same Hub commit, and for a frozen
    layer (in no checkpoint) the same fingerprint of the local file it was read from."""
    if net.bridge is None:
        return
    trained, loaded = config["llm_layer"] or {}, net.bridge.layer.config
    if loaded.commit != trained.get("commit"):
        raise InputError(f"the run trained with {config['model']['llm']} at commit {trained.get('commit')}, but "
                         f"commit {loaded.commit} was loaded; expected the same weights (the layer is not in "
                         f"the checkpoint)")
    if config["model"]["mode"] == "frozen":  # a trained layer's weights are in the checkpoint itself
        check_fingerprint(trained.get("fingerprint"), loaded)


def load_weights_of_run(net: torch.nn.Module, run_dir, checkpoint: str = "best") -> dict:
    """Load the trained weights of another run's checkpoint into `net`, a model built anew (train.py
    --init-from): it must be the same model, its frozen layer the same weights, or the adapters and the
    CNN would have learnt around another layer. Returns the checkpoint's info."""
    run_dir = Path(run_dir)
    source = read_run_config(run_dir)
    ours, theirs = asdict(net.config), source["model"]
    differing = [name for name in ours if name != "revision" and ours[name] != theirs.get(name)]
    if differing:
        name = differing[0]
        raise InputError(f"--init-from {run_dir}: its model has {name} {theirs.get(name)!r}, this run's "
                         f"{ours[name]!r}; expected the same model (give the flags that run was trained with)")
    check_same_layer(source, net)
    return load_checkpoint(run_dir, checkpoint, net)


def load_run(run_dir, checkpoint: str = "best") -> tuple[torch.nn.Module, dict, dict]:
    """A run of train.py -> (model in eval mode on the CPU, its config.json, the checkpoint's JSON part).

    The model is rebuilt from config["model"]. A frozen LLM layer, which no checkpoint holds, is read again
    from where the run found it (a local directory or GGUF, or the local Hub cache) and must be the same
    weights (fingerprint or commit)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not has_checkpoint(run_dir, checkpoint):
        other = "last" if checkpoint == "best" else "best"
        raise FileNotFoundError(f"{run_dir / checkpoint}.safetensors not found: expected the '{checkpoint}' "
                                f"checkpoint, which train.py writes at the end of each epoch; let the run finish "
                                f"an epoch, or try --checkpoint {other}")
    net = rebuild_model(config)
    info = load_checkpoint(run_dir, checkpoint, net)
    return net.eval(), config, info
