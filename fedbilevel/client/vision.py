"""Image classification clients: the offline digits ViT, image batches and the classifier eval loop.

The personalized part of an image client is its LoRA adapter on the attention projections
*and* the classification head (peft ``modules_to_save``): the head is an ordinary array of
the adapter, so every strategy treats it like the LoRA arrays (FedBip weighs it with the
same similarity weights — FedBip-L with the head's own — FedAvg averages it, local keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbilevel import protocol
from fedbilevel.client.evaluate import autocast_bf16, batches
from fedbilevel.client.metrics import macro_f1
from fedbilevel.data.digits import NUM_CLASSES, ImageExample, pretraining_set

# The digits foundation model: a small ViT pretrained in code on the clean digits.
DIGITS_VIT_CONFIG = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "num_labels": NUM_CLASSES,
}
DIGITS_PRETRAIN_EPOCHS = 60
_PRETRAIN_SEED = 0


def build_digits_vit(folder: Path) -> None:
    """Pretrain the digits ViT on the clean pretraining images and save it to ``folder`` (about 20 s on a CPU)."""
    from transformers import ViTConfig, ViTForImageClassification

    images, labels = pretraining_set()
    pixels, targets = torch.from_numpy(images), torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PRETRAIN_SEED)
        model = ViTForImageClassification(ViTConfig(**DIGITS_VIT_CONFIG))
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        generator = torch.Generator().manual_seed(_PRETRAIN_SEED)
        model.train()
        for _ in range(DIGITS_PRETRAIN_EPOCHS):
            for batch in torch.randperm(len(pixels), generator=generator).split(64):
                loss = model(pixel_values=pixels[batch], labels=targets[batch]).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.eval()
    model.save_pretrained(folder)


class ImageCodec:
    """Batches of images for the shared train loop: ``pixel_values`` and ``labels``."""

    def encode(self, examples: Sequence[ImageExample]) -> list[tuple[np.ndarray, int]]:
        return [(example.pixels, example.label) for example in examples]

    def collate(self, items: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.from_numpy(np.stack([pixels for pixels, _ in items])),
            "labels": torch.tensor([label for _, label in items], dtype=torch.long),
        }


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    examples: Sequence[ImageExample],
    *,
    batch_size: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
) -> dict[str, float | list[float]]:
    """Accuracy and macro F1 of the model's predictions on ``examples``.

    Returns ``accuracy``, ``macro_f1`` (over the classes present in the labels or the
    predictions), ``items-accuracy`` (1.0 / 0.0 per example, for intervals over items) and
    ``eval-seconds``.
    """
    if not examples:
        raise ValueError("examples: a client needs at least one test example")
    started = time.time()
    codec = ImageCodec()
    predictions: list[int] = []
    model.eval()
    for chunk in batches(examples, batch_size):
        batch = codec.collate(codec.encode(chunk))
        with autocast_bf16(device, bf16_autocast):
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        predictions += logits.argmax(dim=-1).tolist()
    labels = [example.label for example in examples]
    correct = [float(p == y) for p, y in zip(predictions, labels)]
    return {"accuracy": sum(correct) / len(correct), "macro_f1": macro_f1(labels, predictions), f"{protocol.ITEMS_PREFIX}accuracy": correct,
            protocol.EVAL_SECONDS: time.time() - started}


def image_preprocessor(model_name: str) -> Callable[[Any], np.ndarray]:
    """A function from a PIL image to the ``(channels, height, width)`` float32 pixels ``model_name`` expects.

    The model's own image processor (resizing, normalisation) where it ships one; otherwise,
    as for :data:`~fedbilevel.client.model.DIGITS_VIT`, the image resized to the model's
    ``image_size``, in its number of channels, scaled to [0, 1].
    """
    from transformers import AutoConfig, AutoImageProcessor

    from fedbilevel.client.model import resolve_model_source

    source = resolve_model_source(model_name)
    config = AutoConfig.from_pretrained(source)
    channels = int(config.num_channels)
    if channels not in (1, 3):
        raise ValueError(f"run-config key 'model-name': value {model_name!r} takes {channels} channels; allowed: 1 or 3")
    mode = "L" if channels == 1 else "RGB"
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):  # no preprocessor_config.json: the plain conversion below
        processor = None
    if processor is not None:
        return lambda image: processor(images=image.convert(mode), return_tensors="np")["pixel_values"][0].astype(np.float32)
    size = int(config.image_size)

    def convert(image) -> np.ndarray:
        pixels = np.asarray(image.convert(mode).resize((size, size)), dtype=np.float32) / 255.0
        return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))

    return convert
