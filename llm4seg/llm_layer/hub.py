"""One layer of a Hugging Face Hub repo, fetched alone with HTTP Range requests and cached.

The revision is resolved to a commit through config.json (hf_hub_download; its snapshot folder
is the commit). The safetensors header(s) of the file(s) holding `model.layers.{i}.*` are read
with Range requests (a sharded repo's index names the shard), then only the layer's byte ranges
are downloaded, adjacent tensors in one request, into a small safetensors file

    $HF_HOME/llm4seg/<org>--<name>/<commit>/model.layers.<i>.safetensors

which later calls read with no network at all. The LLM's final norm (model.norm.weight), when asked
for, is fetched alone the same way into model.norm.safetensors beside it. Requests go through
huggingface_hub's HTTP session with its retries, so its endpoint (HF_ENDPOINT), token and proxies apply
and a dropped connection is tried again; a body cut short, and every other failure, becomes a one-line error
that says what to do (gated: accept the licence and log in; unreachable: connect once). A file of the
repo that is malformed (config.json, the index, a safetensors header) raises files.InputError naming it;
a cached layer or norm file that no longer reads is fetched again.
"""
import functools
import json
import os
import socket
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..files import InputError, write_atomically
from .layers import LayerConfig
from .safetensors_file import (FINAL_NORM, TensorEntry, check_entries, layer_entries, parse_header, pickled_only,
                               read_json, read_layer_files, read_named_tensor, read_tensor_file, read_weight_map)


def from_hub(repo: str, layer: int, revision: str | None, need_weights: bool):
    """(config, tensors or None) of the `layer`-th layer of a Hub repo at `revision`."""
    from huggingface_hub import try_to_load_from_cache

    # A layer fetched before needs no network at all: config.json's cached copy names the commit
    # (the Hub cache keeps files under snapshots/<commit>/), which names our layer file.
    config_file = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(config_file, str) or (
            need_weights and not layer_cache_file(repo, Path(config_file).parent.name, layer).is_file()):
        config_file = _hub_download(repo, "config.json", revision)
    commit = Path(config_file).parent.name
    hf = read_json(Path(config_file), f"{repo}'s config.json")
    config = LayerConfig.from_hf(hf, layer, repo=repo, commit=commit, origin=config_file)
    if not need_weights:
        return config, None
    cached_layer = layer_cache_file(repo, commit, layer)
    if cached_layer.is_file():
        try:
            return config, read_layer_files([cached_layer], config, cached_layer)[0]
        except InputError as e:
            print(f"llm_layer: the cached layer does not read ({e}); fetching it again", file=sys.stderr)
    _fetch_layer(repo, commit, config, cached_layer)
    return config, read_layer_files([cached_layer], config, cached_layer)[0]


def final_norm_from_hub(repo: str, revision: str | None) -> Tensor:
    """FINAL_NORM of a Hub repo at `revision`: its bytes alone, cached beside the layers."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    config_file = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(config_file, str) or not _norm_cache_file(repo, Path(config_file).parent.name).is_file():
        config_file = _hub_download(repo, "config.json", revision)
    commit = Path(config_file).parent.name
    cached = _norm_cache_file(repo, commit)
    if cached.is_file():
        try:
            return read_tensor_file(cached, FINAL_NORM)
        except InputError as e:
            print(f"llm_layer: the cached norm does not read ({e}); fetching it again", file=sys.stderr)
    try:
        index_file = Path(_hub_download(repo, "model.safetensors.index.json", commit))
    except EntryNotFoundError:
        filename = "model.safetensors"
    else:
        filename = read_weight_map(index_file).get(FINAL_NORM)
    if filename is None:
        raise InputError(f"{repo}'s model.safetensors.index.json lists no {FINAL_NORM}: expected the final "
                         f"norm's shard in its weight_map")
    norm = read_named_tensor(_HubRangeReader(repo, commit, filename).read, FINAL_NORM,
                             f"{repo}/{filename}@{commit[:10]}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cached, lambda temporary: save_file({FINAL_NORM: norm}, temporary))
    return norm


def _norm_cache_file(repo: str, commit: str) -> Path:
    return layer_cache_file(repo, commit, 1).parent / "model.norm.safetensors"


def layer_cache_file(repo: str, commit: str, layer: int) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "llm4seg" / repo.replace("/", "--") / commit / f"model.layers.{layer - 1}.safetensors"


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection within timeout_s. Offline, huggingface_hub retries each
    request with back-off (5 retries, ~23 s) before giving up; knowing first, the cache is read at once and
    a missing file is an error at once. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the direct probe proves
    nothing, so the Hub is assumed reachable and huggingface_hub decides."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return not constants.HF_HUB_OFFLINE
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_download(repo: str, filename: str, revision: str | None) -> str:
    """hf_hub_download with the Hub's failures turned into messages that say what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError)

    try:
        return hf_hub_download(repo, filename, revision=revision, local_files_only=not hub_reachable())
    except GatedRepoError as e:
        raise PermissionError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo} , then run "
            f"`hf auth login` or set HF_TOKEN to a token of that account") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"revision {revision!r} not found in {repo}") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{repo} not found on the Hub ({constants.ENDPOINT}); check the name, "
                         f"or log in if it is private") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "its host did not answer"
        raise ConnectionError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) and {filename} of {repo} is "
            f"not cached under {constants.HF_HOME} ({offline}): connect once to cache the layer (a gated repo "
            f"such as meta-llama's also needs its licence accepted on https://huggingface.co/{repo} and "
            f"`hf auth login` or HF_TOKEN), or pass a local directory holding config.json and *.safetensors, "
            f"or a .gguf file") from e


def _fetch_layer(repo: str, commit: str, config: LayerConfig, destination: Path) -> None:
    """Download only the layer's tensors (`model.layers.{i}.*`, ...) into a new safetensors file at `destination`."""
    from huggingface_hub import file_exists
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index_file = Path(_hub_download(repo, "model.safetensors.index.json", commit))
    except EntryNotFoundError:
        files = ["model.safetensors"]
    else:
        files = sorted({f for n, f in read_weight_map(index_file).items() if n.startswith(config.prefixes)})
    if not files:
        raise InputError(f"{repo}'s model.safetensors.index.json lists no tensor of {config.prefix[:-1]}: "
                         f"expected the layer's shards in its weight_map")

    entries = {}
    for filename in files:
        reader = _HubRangeReader(repo, commit, filename)
        try:
            header_len, header = parse_header(reader.read, f"{repo}/{filename}@{commit[:10]}")
        except EntryNotFoundError:
            if file_exists(repo, "pytorch_model.bin", revision=commit):
                raise pickled_only(repo) from None
            raise
        entries.update(layer_entries(header, header_len, config, filename, f"{repo}/{filename}@{commit[:10]}"))
    check_entries(entries, config, f"{repo}@{commit[:10]}")
    _write_layer_file(entries, destination, repo, commit, config)


def _coalesce(entries: list[TensorEntry]) -> list[list[TensorEntry]]:
    """Group tensors stored back to back in the same file, so each group is one Range request."""
    groups = []
    for entry in sorted(entries, key=lambda e: (e.file, e.start)):
        if groups and groups[-1][-1].file == entry.file and groups[-1][-1].end == entry.start:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def _write_layer_file(entries: dict[str, TensorEntry], destination: Path, repo, commit, config):
    """Stream the layer's byte ranges into a valid safetensors file, written atomically so an
    interrupted download leaves nothing that looks complete."""
    from tqdm.auto import tqdm

    groups = _coalesce(list(entries.values()))
    order = [e for group in groups for e in group]
    header, offset = {}, 0
    for e in order:
        header[config.prefix + e.name] = {
            "dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.end - e.start]}
        offset += e.end - e.start
    header["__metadata__"] = {"repo": repo, "commit": commit, "layer": str(config.layer)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes

    def write(temporary: Path) -> None:
        desc = f"{repo} layer {config.layer} (model.layers.{config.index})"
        with open(temporary, "wb") as out, tqdm(total=offset, unit="B", unit_scale=True, desc=desc) as bar:
            out.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
            for group in groups:
                reader = _HubRangeReader(repo, commit, group[0].file)
                for chunk in reader.stream(group[0].start, group[-1].end, what=group[0].name):
                    out.write(chunk)
                    bar.update(len(chunk))

    destination.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(destination, write)


class _HubRangeReader:
    """Byte ranges of one file of a Hub repo at a fixed commit, through huggingface_hub's HTTP
    session (its endpoint, token and proxies), following the Hub's redirects to its storage."""

    def __init__(self, repo: str, commit: str, filename: str):
        from huggingface_hub import hf_hub_url
        self.repo, self.filename = repo, filename
        self.url = hf_hub_url(repo, filename, revision=commit)

    def stream(self, start: int, end: int, what: str = "header", chunk_size: int = 1 << 20):
        """Yield the bytes [start, end) in chunks; raise, naming `what`, if fewer arrive."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        headers = build_hf_headers()
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        received, interrupted = 0, None
        # http_stream_backoff retries what fails before an answer (a dropped kept-alive connection,
        # a timeout, HTTP 429 / 5xx); a body cut short is caught below and named.
        with http_stream_backoff("GET", self.url, headers=headers, follow_redirects=True) as response:
            if response.status_code == 416:  # Range Not Satisfiable: the header's offsets lie past the file's end
                raise InputError(f"{self.repo}/{self.filename} has no bytes {start}..{end} for {what}: its header "
                                 f"is corrupt; expected offsets inside the file, pick another revision")
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise ConnectionError(f"{self.url} ignored the byte-range request (HTTP "
                                      f"{response.status_code}); refusing to download the whole file")
            try:
                for chunk in response.iter_bytes(chunk_size):
                    received += len(chunk)
                    yield chunk
            except Exception as e:  # the HTTP client's own "connection closed early" error
                interrupted = e
        if received != end - start or interrupted:
            raise InputError(f"{self.repo}/{self.filename} is truncated or changed: got {received} of "
                             f"{end - start} bytes for {what} (bytes {start}..{end})") from interrupted

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.stream(start, end))
