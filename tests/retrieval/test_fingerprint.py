"""`model_fingerprint`: stable, fast on the real model, and changed by the config, the
tokenizer and the weights."""

from __future__ import annotations

import json
import shutil
import time

import torch
from safetensors.torch import save_file

from engine.loader import model_fingerprint


def make_model_dir(path, weight: torch.Tensor):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    save_file({"w": weight, "b": torch.zeros(3)}, str(path / "model.safetensors"))
    return path


def test_real_model_fingerprint_is_stable_and_fast(model_dir):
    start = time.perf_counter()
    first = model_fingerprint(model_dir)
    assert time.perf_counter() - start < 1.0
    assert first == model_fingerprint(model_dir) and len(first) == 64


def test_config_tokenizer_and_weights_change_it(tmp_path):
    weight = torch.arange(1000.0).reshape(10, 100)
    base = model_fingerprint(make_model_dir(tmp_path / "base", weight))
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "base", copy)
    assert model_fingerprint(copy) == base  # the path is not part of it
    (copy / "config.json").write_text(json.dumps({"hidden_size": 5}))
    assert model_fingerprint(copy) != base
    (copy / "tokenizer.json").write_text("{}")
    edited = weight.clone()
    edited[5, 50] += 1
    assert model_fingerprint(make_model_dir(tmp_path / "edited", edited)) != base
    assert model_fingerprint(copy) != model_fingerprint(tmp_path / "base")
