"""Test-session setup shared by every test file.

The Hugging Face Hub is unreachable here, so a local stand-in (tests/hub_standin.py) serves the
checkpoints the tests write. huggingface_hub reads HF_ENDPOINT and HF_HOME once, when it is first
imported, so both are set here, before any test module imports it. Likewise triton reads
TRITON_INTERPRET when it is first imported (transformers imports it too): without a GPU, the
Triton kernels run in its CPU interpreter.
"""
import os
import sys
import tempfile
from pathlib import Path

# One thread per test process: `make test` runs two processes on two cores, and train.py / eval.py would
# otherwise give each process every core less its workers (runtime.set_cpu_threads). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import HubStandIn  # noqa: E402

_HUB = HubStandIn().start()
os.environ["HF_ENDPOINT"] = _HUB.url
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="llm4seg-hf-home-")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def hub() -> HubStandIn:
    """The running Hub stand-in (HF_ENDPOINT points at it)."""
    return _HUB


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64, 4 / 2 heads) saved by transformers, with non-trivial norm
    weights: the LLM of the training and evaluation tests, passed as `--llm <dir> --layer 2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return directory
