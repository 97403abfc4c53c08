"""The frozen base model: loaded from the zoo on a device, in one of the precision modes.

The base weights are float32 (``fp32``, ``bf16-autocast``), bfloat16 (``bf16``) or NF4
through bitsandbytes (``4bit``, CUDA only); the LoRA adapters on top
(:mod:`fedbilevel.models.adapter`) stay float32 in every mode.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from fedbilevel.models.zoo import auto_class, is_image_classifier, resolve_model_source


def load_base_model(
    model_name: str, *, seed: int = 0, precision: str = "fp32", device: str | torch.device = "cpu", num_labels: int = 0
) -> PreTrainedModel:
    """Load the frozen base model on ``device``, in eval mode.

    Parameters
    ----------
    model_name : str
        See :func:`~fedbilevel.models.zoo.resolve_model_source`.
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
        model = auto_class(model_name).from_pretrained(source, **options)
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
        raise ValueError(
            f"run-config key 'precision': value {precision!r} is not allowed; "
            "expected one of fp32, bf16-autocast, bf16, 4bit"
        )
    if device.type != "cuda":
        raise ValueError(
            f"run-config key 'precision': value '4bit' is not allowed on device {str(device)!r}; "
            "4-bit weights need a CUDA GPU (use 'bf16' or 'fp32')"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "run-config key 'precision': value '4bit' needs the bitsandbytes package "
            "(pip install bitsandbytes), which is not installed"
        )
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quantization, "dtype": torch.bfloat16, "device_map": {"": device}}
