"""Malformed input files: every reader of llm_layer raises files.InputError naming the file, and no other
exception, for each known way a file goes bad and for a seeded fuzz of truncations and byte flips; a
cache file that no longer reads is rebuilt.

The files are conftest.py's 2-layer tiny Llama (tiny_llm: config.json + model.safetensors), copied and
edited under tmp_path, served by the Hub stand-in where a case concerns the Hub; its GGUF is written here
with the gguf package, quantised as llama.cpp would (without the q / k row order, which these tests do
not look at). The fuzz draws 300 mutations from fixed seeds (3 s on 2 cores; the file, 13 s): a third
truncate a file, the rest flip one to three bytes, half of them inside the header or metadata, where a
flip changes the file's structure rather than a weight. A flip inside the tensor data legitimately loads
other numbers: then the layer's fingerprint must change too.
"""
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm4seg import llm_layer
from llm4seg.files import InputError
from llm4seg.llm_layer import load_layer
from llm4seg.llm_layer.layers import expected_shapes
from gguf_files import write_llama_gguf

LAYER = 1                                       # model.layers.0: every fuzzed file holds it
TARGET = "model.layers.0.mlp.down_proj.weight"  # the tensor whose header entry the cases break


# --- files to break ----------------------------------------------------------------------------


def copy_model(tiny_llm: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llm / name, directory / name)
    return directory


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor data) of a safetensors file's bytes."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]), data[8 + header_len:]


def join_safetensors(header: dict | list, tensors: bytes) -> bytes:
    header_bytes = json.dumps(header).encode()
    return len(header_bytes).to_bytes(8, "little") + header_bytes + tensors


def broken_safetensors(data: bytes, case: str, target: str) -> bytes:
    """`data` (a safetensors file) with its header broken as `case` says, at the entry of `target`."""
    header, tensors = split_safetensors(data)
    start, end = header[target]["data_offsets"]
    if case == "a JSON list":
        return join_safetensors([header], tensors)
    if case == "header length past the file":
        return (len(data) + 100).to_bytes(8, "little") + data[8:]
    if case == "non-UTF-8 header":
        at = data.index(target.encode())
        return data[:at] + b"\xff" + data[at + 1:]
    if case == "non-JSON header":
        header_len = int.from_bytes(data[:8], "little")
        return data[:8] + b"{not json" + b" " * (header_len - 9) + tensors
    if case == "no data_offsets":
        del header[target]["data_offsets"]
    elif case == "negative offsets":
        header[target]["data_offsets"] = [-8, end - start - 8]
    elif case == "reversed offsets":
        header[target]["data_offsets"] = [end, start]
    elif case == "offsets past the file end":  # the span is right, its second half lies past the end
        header[target]["data_offsets"] = [len(tensors) - (end - start) // 2, len(tensors) + (end - start) // 2]
    elif case == "non-integer shape":
        header[target]["shape"] = [float(d) for d in header[target]["shape"]]
    return join_safetensors(header, tensors)


SAFETENSORS_CASES = ["a JSON list", "no data_offsets", "negative offsets", "reversed offsets",
                     "offsets past the file end", "non-integer shape", "header length past the file",
                     "non-UTF-8 header", "non-JSON header"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llm, tmp_path_factory) -> Path:
    """Both layers of the tiny Llama as a quantised GGUF file."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    config = json.loads((tiny_llm / "config.json").read_text())
    write_llama_gguf(load_file(tiny_llm / "model.safetensors"), config, config["num_hidden_layers"], path)
    return path


def assert_input_error_naming(load, *names: str) -> InputError:
    """load() raises files.InputError (nothing else), one line, naming each of `names`."""
    with pytest.raises(InputError) as raised:
        load()
    message = str(raised.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return raised.value


# --- safetensors headers: a folder, the Hub, the final norm -----------------------------------------


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
@pytest.mark.parametrize("source", ["folder", "hub", "final norm"])
def test_a_broken_safetensors_header_is_named(tiny_llm, hub, tmp_path, source, case):
    directory = copy_model(tiny_llm, tmp_path / "model")
    file = directory / "model.safetensors"
    target = "model.norm.weight" if source == "final norm" else TARGET
    file.write_bytes(broken_safetensors(file.read_bytes(), case, target))
    if source == "folder":
        assert_input_error_naming(lambda: load_layer(str(directory), LAYER), str(file))
    elif source == "final norm":
        assert_input_error_naming(lambda: llm_layer.load_final_norm(str(directory)), str(file))
    else:
        repo = f"bad-files/{case.replace(' ', '-')}"
        hub.add_repo(repo, directory)
        assert_input_error_naming(lambda: load_layer(repo, LAYER), f"{repo}/model.safetensors")


# --- config.json and the index -------------------------------------------------------------------


CONFIG_CASES = {
    "not JSON": lambda config: b'{"model_type": "llama", "hidden_size": 6',
    "no num_hidden_layers": lambda config: {k: v for k, v in config.items() if k != "num_hidden_layers"},
    "no hidden_size": lambda config: {k: v for k, v in config.items() if k != "hidden_size"},
    "0 heads": lambda config: config | {"num_attention_heads": 0},
    "negative heads": lambda config: config | {"num_attention_heads": -4},
    "non-integer heads": lambda config: config | {"num_attention_heads": 4.5},
    "heads as a string": lambda config: config | {"num_attention_heads": "4"},
    "kv heads not dividing the heads": lambda config: config | {"num_key_value_heads": 3},
    "no rms_norm_eps": lambda config: {k: v for k, v in config.items() if k != "rms_norm_eps"},
    "a JSON list": lambda config: [config],
}


def write_config(directory: Path, case: str) -> Path:
    file = directory / "config.json"
    edited = CONFIG_CASES[case](json.loads(file.read_text()))
    file.write_bytes(edited if isinstance(edited, bytes) else json.dumps(edited).encode())
    return file


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.parametrize("mode", ["frozen", "random"])
def test_a_broken_config_json_is_named(tiny_llm, tmp_path, case, mode):
    directory = copy_model(tiny_llm, tmp_path / "model")
    file = write_config(directory, case)
    assert_input_error_naming(lambda: load_layer(str(directory), LAYER, mode=mode), str(file))


def test_a_hub_config_json_that_is_not_json_is_named(tiny_llm, hub, tmp_path):
    directory = copy_model(tiny_llm, tmp_path / "model")
    write_config(directory, "not JSON")
    hub.add_repo("bad-files/config-not-json", directory)
    error = assert_input_error_naming(lambda: load_layer("bad-files/config-not-json", LAYER), "config.json")
    assert "models--bad-files--config-not-json" in str(error)  # the cached copy, which can be deleted


INDEX_CASES = {"not JSON": b'{"weight_map": {', "no weight_map": b'{"metadata": {}}',
               "a weight_map that is a list": b'{"weight_map": ["model.safetensors"]}'}


@pytest.mark.parametrize("case", list(INDEX_CASES))
@pytest.mark.parametrize("source", ["folder", "hub", "final norm"])
def test_a_broken_index_is_named(tiny_llm, hub, tmp_path, source, case):
    directory = copy_model(tiny_llm, tmp_path / "model")
    index = directory / "model.safetensors.index.json"
    index.write_bytes(INDEX_CASES[case])
    if source == "folder":
        assert_input_error_naming(lambda: load_layer(str(directory), LAYER), str(index))
    elif source == "final norm":
        assert_input_error_naming(lambda: llm_layer.load_final_norm(str(directory)), str(index))
    else:
        repo = f"bad-files/index-{case.replace(' ', '-')}"
        hub.add_repo(repo, directory)
        assert_input_error_naming(lambda: load_layer(repo, LAYER), "model.safetensors.index.json",
                                  f"models--{repo.replace('/', '--')}")


def test_an_index_naming_a_missing_shard_is_named(tiny_llm, tmp_path):
    directory = copy_model(tiny_llm, tmp_path / "model")
    names = split_safetensors((directory / "model.safetensors").read_bytes())[0]
    weight_map = {name: "model-00002-of-00002.safetensors" for name in names if name != "__metadata__"}
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert_input_error_naming(lambda: load_layer(str(directory), LAYER), str(index), "model-00002-of-00002")


# --- GGUF files and caches -----------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["to 1000 bytes", "in half"])
def test_a_truncated_gguf_is_named(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:1000] if cut == "to 1000 bytes" else data[:len(data) // 2])
    error = assert_input_error_naming(lambda: load_layer(str(path), 2), str(path))
    assert "truncated or corrupt" in str(error)


def gguf_cache_files(path: Path, layer: int) -> tuple[Path, Path]:
    (cache,) = Path(os.environ["HF_HOME"], "llm4seg", "gguf").glob(f"{path.stem}-*")
    return cache / f"layer{layer}.json", cache / f"layer{layer}.safetensors"


@pytest.mark.parametrize("damage", ["json not JSON", "json of an older version", "tensors cut short",
                                    "tensors of another shape"])
def test_a_damaged_gguf_cache_is_rebuilt(tiny_gguf, tmp_path, damage):
    import gguf
    from safetensors.torch import save_file

    path = tmp_path / f"{damage.replace(' ', '-')}.gguf"  # its own cache directory
    shutil.copy(tiny_gguf, path)
    first = load_layer(str(path), 2)
    hf_file, tensors_file = gguf_cache_files(path, 2)
    if damage == "json not JSON":
        hf_file.write_text('{"config": {')
    elif damage == "json of an older version":  # the config alone, no fingerprint
        hf_file.write_text(json.dumps(json.loads(hf_file.read_text())["config"]))
    elif damage == "tensors cut short":
        tensors_file.write_bytes(tensors_file.read_bytes()[:5000])
    else:
        save_file({"mlp.up_proj.weight": torch.zeros(3, 3)}, tensors_file)
    parsed = []
    original_reader = gguf.GGUFReader
    gguf.GGUFReader = lambda *args: parsed.append(args) or original_reader(*args)
    try:
        again = load_layer(str(path), 2)
    finally:
        gguf.GGUFReader = original_reader
    assert len(parsed) == 1, "a damaged cache is rebuilt from the GGUF"
    assert again.config == first.config and again.config.fingerprint is not None
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert load_layer(str(path), 2).config == first.config  # the rebuilt cache reads


def test_damaged_hub_caches_are_fetched_again(tiny_llm, hub, tmp_path):
    directory = copy_model(tiny_llm, tmp_path / "model")
    repo = "bad-files/damaged-cache"
    hub.add_repo(repo, directory)
    first, norm = load_layer(repo, LAYER), llm_layer.load_final_norm(repo)
    (layer_file,) = Path(os.environ["HF_HOME"], "llm4seg", "bad-files--damaged-cache").rglob("model.layers.0.*")
    layer_file.write_bytes(layer_file.read_bytes()[:1000])
    norm_file = layer_file.parent / "model.norm.safetensors"
    norm_file.write_bytes(b"\xff" * 16)
    hub.log.clear()
    again = load_layer(repo, LAYER)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert torch.equal(llm_layer.load_final_norm(repo), norm)
    assert hub.sent(repo, "model.safetensors"), "the layer and the norm were fetched again"
    hub.log.clear()
    load_layer(repo, LAYER), llm_layer.load_final_norm(repo)
    assert hub.sent(repo) == [], "and cached again"


# --- fuzz ------------------------------------------------------------------------------------------


def mutations(data: bytes, rng: random.Random, count: int, structure_end: int) -> list[bytes]:
    """`count` mutated copies of `data`: a third truncated at a random length, the rest with one to three
    bytes xor'ed with a random non-zero byte, half of them in data[:structure_end] (header, metadata)."""
    mutated = []
    for _ in range(count):
        if rng.random() < 1 / 3:
            mutated.append(data[:rng.randrange(len(data))])
            continue
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(structure_end) if rng.random() < 0.5 else rng.randrange(len(data))
            flipped[at] ^= rng.randrange(1, 256)
        mutated.append(bytes(flipped))
    return mutated


def loads_or_input_error(load, original: torch.nn.Module, where: Path) -> str:
    """Run load(): "error" for a files.InputError naming `where` (the folder or file); else check that a
    working layer came back whose fingerprint moved if any weight did, and return "changed" or "same".
    Any other exception fails the test."""
    try:
        layer = load()
    except InputError as e:
        assert str(where) in str(e)
        return "error"
    params = dict(layer.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == expected_shapes(layer.config)
    x = torch.randn(1, 3, layer.config.hidden_size)
    assert layer(x).shape == x.shape
    same = all(torch.equal(params[n], p) for n, p in original.named_parameters())
    if not same:
        assert layer.config.fingerprint["sha256"] != original.config.fingerprint["sha256"], "weights changed silently"
    return "same" if same else "changed"


def test_fuzzed_model_folders_load_or_raise_input_error(tiny_llm, tmp_path):
    directory = copy_model(tiny_llm, tmp_path / "model")
    original = load_layer(str(directory), LAYER)
    weights, config = (directory / "model.safetensors").read_bytes(), (directory / "config.json").read_bytes()
    outcomes = []
    rng = random.Random(0)
    for data in mutations(weights, rng, 120, 8 + int.from_bytes(weights[:8], "little")):
        (directory / "model.safetensors").write_bytes(data)
        outcomes.append(loads_or_input_error(lambda: load_layer(str(directory), LAYER), original, directory))
    (directory / "model.safetensors").write_bytes(weights)
    for data in mutations(config, rng, 60, len(config)):
        (directory / "config.json").write_bytes(data)
        outcomes.append(loads_or_input_error(lambda: load_layer(str(directory), LAYER), original, directory))
    # Each outcome happened: the fuzz reaches both the errors and the loads, of both kinds.
    assert {"error", "same", "changed"} <= set(outcomes), outcomes


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # flipped scales dequantise to NaN
def test_fuzzed_gguf_files_load_or_raise_input_error(tiny_gguf, tmp_path):
    import gguf

    original = load_layer(str(tiny_gguf), LAYER)
    data = tiny_gguf.read_bytes()
    structure_end = min(int(t.data_offset) for t in gguf.GGUFReader(tiny_gguf).tensors)
    outcomes = []
    # Each mutation under its own name: the GGUF cache is keyed by path, size and mtime, and a flip keeps
    # the size while two writes within one clock tick may keep the mtime.
    for i, mutated in enumerate(mutations(data, random.Random(1), 120, structure_end)):
        path = tmp_path / f"mutation{i}.gguf"
        path.write_bytes(mutated)
        outcomes.append(loads_or_input_error(lambda path=path: load_layer(str(path), LAYER), original, path))
    assert {"error", "same", "changed"} <= set(outcomes), outcomes
