"""The cache of converted models (fedbilevel.models.zoo): built once, then read; rebuilt when its source changes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from fedbilevel.models import zoo


def _packaged(tmp_path, monkeypatch):
    """A packaged model whose 'GGUF' is a small file; its conversion copies the file's array and counts builds."""
    source = tmp_path / "package" / "model.gguf"
    source.parent.mkdir()
    save_file({"weight": np.arange(6, dtype=np.float32)}, str(source))
    builds = []

    class Fake(zoo._PackagedGguf):
        def convert(self, folder):
            builds.append(folder)
            save_file(load_file(str(self.locate(folder))), str(folder / "model.safetensors"))

    packaged = Fake("fake-model", "fake-folder", lambda _scratch: source, lambda: [source])
    monkeypatch.setitem(zoo._PACKAGED_GGUF, "fake-model", packaged)
    monkeypatch.setenv("FEDBILEVEL_CACHE", str(tmp_path / "cache"))
    return source, builds


def test_a_second_load_reads_the_cache_with_identical_weights(tmp_path, monkeypatch):
    _, builds = _packaged(tmp_path, monkeypatch)
    first = zoo.resolve_model_source("fake-model")
    weights = load_file(os.path.join(first, "model.safetensors"))
    second = zoo.resolve_model_source("fake-model")
    assert second == first and len(builds) == 1
    assert np.array_equal(load_file(os.path.join(second, "model.safetensors"))["weight"], weights["weight"])


def test_a_changed_source_invalidates_the_cache(tmp_path, monkeypatch):
    source, builds = _packaged(tmp_path, monkeypatch)
    folder = zoo.resolve_model_source("fake-model")
    save_file({"weight": np.full(6, 7.0, dtype=np.float32)}, str(source))  # e.g. the package upgraded
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert zoo.resolve_model_source("fake-model") == folder and len(builds) == 2
    assert load_file(os.path.join(folder, "model.safetensors"))["weight"].tolist() == [7.0] * 6
    assert zoo.resolve_model_source("fake-model") == folder and len(builds) == 2
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_cache_without_its_source_key_is_rebuilt_and_a_missing_package_keeps_a_cached_model(tmp_path, monkeypatch):
    _, builds = _packaged(tmp_path, monkeypatch)
    folder = zoo.resolve_model_source("fake-model")
    (tmp_path / "cache" / "models" / "fake-folder.source").unlink()  # a cache from before the key
    assert zoo.resolve_model_source("fake-model") == folder and len(builds) == 2

    def missing():
        raise ModuleNotFoundError("no package")

    offline = dataclasses.replace(zoo._PACKAGED_GGUF["fake-model"], sources=missing)
    monkeypatch.setitem(zoo._PACKAGED_GGUF, "fake-model", offline)
    assert zoo.resolve_model_source("fake-model") == folder and len(builds) == 2
