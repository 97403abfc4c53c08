"""LoRA adapters: build a model with one, and move its weights in and out as NumPy arrays.

The personalised part of every client is a LoRA adapter on a frozen base model
(:mod:`fedbilevel.models.base`). This module attaches adapters and moves adapter weights
in and out of the model as plain NumPy arrays (the form Flower exchanges). The server
uses it too: for the common initial adapter of a seed (computed without loading the base
weights) and to save adapters as standard peft folders.

An image classifier's adapter also carries its classification head (peft
``modules_to_save``), initialised to the pretrained head.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
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
from transformers import PreTrainedModel

from fedbilevel.models.base import load_base_model
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import auto_class, classifier_head, is_image_classifier, model_config, resolve_model_source
from fedbilevel.options import not_allowed

# peft's parameter names of LoRA A factors: "...q_proj.lora_A.default.weight", "...lora_embedding_A.default".
_LORA_A_PARAMETER = re.compile(r"(?:^|\.)lora_(?:embedding_)?A\.")


def lora_config(model_name: str, lora: LoraSettings) -> LoraConfig:
    """Build the peft configuration of the adapters.

    Parameters
    ----------
    model_name : str
        See :func:`~fedbilevel.models.zoo.resolve_model_source`; its resolved form is recorded as
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
        See :func:`~fedbilevel.models.zoo.resolve_model_source`.
    lora : LoraSettings
    seed : int, default 0
        Seed of the adapter initialisation. The adapters equal
        ``initial_adapter_arrays(model_name, lora, seed=seed)``.
    precision, device
        Of the base model: see :func:`~fedbilevel.models.base.load_base_model`. The adapters are float32 on ``device``.

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
    # An image classifier's head is part of the adapter and starts at its pretrained weights.
    pretrained = {name: value for name, value in get_adapter_arrays(model).items() if not _is_lora(name)}
    set_adapter_arrays(model, _initialise_adapter(_adapter_shapes(model), seed, pretrained))
    return model.eval()


def enable_gradient_checkpointing(model: PeftModel) -> None:
    """Make the base model recompute its layers' activations in the backward pass, in place.

    Checkpointing is non-reentrant, so gradients reach the LoRA weights inside a checkpointed
    layer although the frozen layers' inputs need none; transformers also hooks a text model's
    input embeddings so that their output requires grad, as peft prepares a model. Activations
    are recomputed in training mode only. Calling it again changes nothing (a client process
    trains its one model every round).

    Parameters
    ----------
    model : peft.PeftModel

    Raises
    ------
    fedbilevel.options.ConfigError
        One line naming ``gradient-checkpointing``, when the base model cannot checkpoint its layers.
    """
    base = model.get_base_model()
    if any(getattr(module, "gradient_checkpointing", False) for module in base.modules()):
        return  # a second call would hook the embeddings again
    try:
        with warnings.catch_warnings():
            # transformers 5 renames it activation_checkpointing_enable; the old name is kept until 6.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as error:  # transformers: the architecture has no checkpointable layers
        raise not_allowed(
            "gradient-checkpointing", True, f"{type(base).__name__} cannot checkpoint its layers; expected false"
        ) from error


@contextmanager
def lora_a_frozen(model: PeftModel) -> Iterator[None]:
    """Within the block, the model's LoRA A factors require no gradient: training moves only the rest.

    FFA-LoRA's client step (``freeze-lora-a``). A process's one model serves every client it
    runs, so the parameters frozen here require a gradient again when the block ends, also when
    it raises.

    Parameters
    ----------
    model : peft.PeftModel

    Raises
    ------
    ValueError
        One line naming ``freeze-lora-a``, when the model has no trainable lora_A parameter.
    """
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and _LORA_A_PARAMETER.search(name)]
    if not frozen:
        raise ValueError("freeze-lora-a: the model has no trainable lora_A parameter; expected a LoRA model")
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def get_adapter_arrays(model: PeftModel, adapter_name: str = "default") -> dict[str, np.ndarray]:
    """Copy the adapter weights out of a model.

    Parameters
    ----------
    model : peft.PeftModel
    adapter_name : str, default "default"
        Which of the model's adapters (FedDPA's client has a second one).

    Returns
    -------
    dict of str to numpy.ndarray
        float32 copies keyed by peft's saved names (e.g.
        ``"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``),
        in the model's stable parameter order.
    """
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
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


def set_adapter_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray], adapter_name: str = "default") -> None:
    """Load adapter weights into a model, in place.

    Parameters
    ----------
    model : peft.PeftModel
    arrays : mapping of str to numpy.ndarray
        Exactly the names and shapes returned by :func:`get_adapter_arrays`.
    adapter_name : str, default "default"
        Which of the model's adapters.

    Raises
    ------
    ValueError
        If a name is missing or unknown, or a shape differs; the message names
        the first offending key with the shape it got and the one expected.
    """
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    _check_arrays(arrays, {name: tuple(tensor.shape) for name, tensor in expected.items()})
    # torch.tensor copies, so read-only buffers (e.g. from Flower messages) are fine.
    state = {name: torch.tensor(np.asarray(arrays[name]), dtype=tensor.dtype) for name, tensor in expected.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
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
        See :func:`~fedbilevel.models.zoo.resolve_model_source`.
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
        pretrained = {
            name: weights[name.removeprefix("base_model.model.")].numpy() for name in shapes if not _is_lora(name)
        }
    return _initialise_adapter(shapes, seed, pretrained)


def save_adapter(arrays: Mapping[str, np.ndarray], directory: str | Path, model_name: str, lora: LoraSettings) -> None:
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
        See :func:`~fedbilevel.models.zoo.resolve_model_source`.
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
    config = model_config(model_name, lora.num_labels)
    with torch.device("meta"):
        skeleton = _get_peft_model(auto_class(model_name).from_config(config), lora_config(model_name, lora))
    return _adapter_shapes(skeleton)


def _is_lora(name: str) -> bool:
    return name.endswith(("lora_A.weight", "lora_B.weight"))


def _initialise_adapter(
    shapes: Mapping[str, tuple[int, ...]], seed: int, pretrained: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Draw LoRA weights as peft's default initialisation, from ``seed``; a head's arrays from ``pretrained``."""
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
                f"cannot initialise adapter parameter {name!r}: "
                "only linear LoRA layers and a pretrained head are supported"
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
