"""The library is one installable package, `llm4seg`, that shadows nothing and that nothing shadows.

transformers 5.25 requires Hugging Face's own distribution `kernels`, whose import name this project's kernels
once had at the top level: whichever was imported first won, and the other failed. These tests fail before a
user does: no top-level name of ours is another installed distribution's module; transformers' modeling code
and llm4seg work in one process whichever is imported first; the wheel installs and imports from anywhere;
and the frozen layer goes into a network nobody here wrote (MONAI's BasicUNet) as the README shows.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def our_top_level_names() -> dict[str, str]:
    """{import name: where} for every name this repository puts at the top of sys.path: its packages and the
    entry scripts beside them (both importable when Python runs from the repository root), and the test
    helpers (importable in every test process: conftest.py puts tests/ on sys.path)."""
    names = {path.name: "package" for path in REPO.iterdir() if (path / "__init__.py").is_file()}
    names |= {path.stem: "entry script" for path in REPO.glob("*.py")}
    names |= {path.stem: "test helper" for path in (REPO / "tests").glob("*.py") if path.stem != "conftest"}
    return names


def test_the_library_is_the_only_package_at_the_top():
    assert [name for name, kind in our_top_level_names().items() if kind == "package"] == ["llm4seg"]


def test_no_top_level_name_of_ours_is_an_installed_distributions_module():
    """importlib.metadata.packages_distributions(): {top-level module: [distributions shipping it]} of this
    environment. Ours (an editable or regular install of llm4seg itself) does not count."""
    theirs = {name: [d for d in dists if d.lower() != "llm4seg"]
              for name, dists in importlib.metadata.packages_distributions().items()}
    clashes = {f"{name} ({kind})": theirs[name] for name, kind in our_top_level_names().items() if theirs.get(name)}
    assert {"torch", "transformers"} <= theirs.keys(), "packages_distributions() sees this environment"
    assert not clashes, f"our top-level names are also modules of installed distributions: {clashes}; rename ours"


# One process per order: which module wins a shared name is decided by the first import in a process.
IMPORT_ORDER_SCRIPT = """
import sys, tempfile
import torch
sys.path.insert(0, {tests!r})
first, second = {order!r}

def import_transformers():
    from transformers.models.bert import modeling_bert  # noqa: F401
    from transformers.models.gemma2 import modeling_gemma2  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

def import_llm4seg():
    import llm4seg  # noqa: F401
    import llm4seg.kernels  # noqa: F401

{{"transformers": import_transformers, "llm4seg": import_llm4seg}}[first]()
{{"transformers": import_transformers, "llm4seg": import_llm4seg}}[second]()

from transformers import BertConfig, BertModel, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from llm4seg import load_layer
from layer_parity import assert_frozen_layer_matches, reference_forward, reference_layer

torch.manual_seed(0)
shapes = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4)
models = {{"llama": LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shapes)),
          "gemma2": Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                                   **shapes)),
          "bert": BertModel(BertConfig(**shapes), add_pooling_layer=False)}}
for family, model in models.items():
    folder = tempfile.mkdtemp(prefix=f"llm4seg-order-{{family}}-")
    model.save_pretrained(folder)
    reference = reference_layer(folder, 2)
    assert_frozen_layer_matches(load_layer(folder, 2, dtype=torch.float32), lambda x: reference_forward(reference, x), 9)
    print(family, "matches")
"""


@pytest.mark.parametrize("order", [("transformers", "llm4seg"), ("llm4seg", "transformers")])
def test_transformers_and_llm4seg_in_one_process_either_order(order):
    """transformers' Llama, Gemma-2 and BERT modeling code and llm4seg, imported in `order` in a new process;
    then each family's layer 2 from a checkpoint transformers wrote, ours against theirs (layer_parity's
    tolerances). Building a transformers model is where its `kernels` integration runs."""
    script = IMPORT_ORDER_SCRIPT.format(tests=str(REPO / "tests"), order=order)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["llama", "matches", "gemma2", "matches", "bert", "matches"]


def test_the_wheel_installs_and_imports_from_anywhere(tmp_path):
    """`pip install .`, then from / (where the repository is not on sys.path): the package, its subpackages
    and transformers' Llama in one process. Built without build isolation (setuptools is a test requirement)
    and installed without dependencies: this environment has them, and no index is needed."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO / "llm4seg", source / "llm4seg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-test.txt", "requirements-demo.txt"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "wheel").glob("llm4seg-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=240)
    code = ("import llm4seg, transformers; from transformers.models.llama import modeling_llama; "
            "from llm4seg import build_model, load_layer; import llm4seg.data, llm4seg.data.volumes, llm4seg.kernels; "
            "print(llm4seg.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()) == site / "llm4seg" / "__init__.py"
    shipped = {path.relative_to(site).as_posix() for path in (site / "llm4seg").rglob("*.py")}
    ours = {path.relative_to(REPO).as_posix() for path in (REPO / "llm4seg").rglob("*.py")}
    assert shipped == ours, "the wheel ships exactly the package's modules"


def test_the_readme_puts_the_layer_into_monais_basicunet(tiny_llm):
    """The README's example, run as written with the tiny Llama for Llama-3.2-1B: MONAI's BasicUNet with the
    frozen layer after its deepest block, one training step; the layer's weights are those of the checkpoint
    still, no gradient reached them, and the adapters and the network trained."""
    from llm4seg import load_layer

    code = re.search(r"network, with the frozen layer at its bottleneck:\n\n```python\n(.*?)```",
                     README, re.S).group(1)
    code = code.replace('load_layer("llama3.2-1b", 15,', f"load_layer({str(tiny_llm)!r}, 2,")
    namespace = {}
    torch.manual_seed(0)
    exec(code, namespace)
    net, layer = namespace["net"], namespace["layer"]
    assert type(net).__module__.startswith("monai.")
    pretrained = load_layer(str(tiny_llm), 2, dtype=torch.float32).state_dict()
    assert all(torch.equal(value, pretrained[name]) for name, value in layer.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())
    bridge = net.down_4[1]
    assert bridge.layer is layer
    for trained in (bridge.project_in.weight, bridge.project_out.weight, net.conv_0.conv_0.conv.weight):
        assert trained.grad is not None and trained.grad.abs().sum() > 0
    assert namespace["loss"].ndim == 0 and torch.isfinite(namespace["loss"])
