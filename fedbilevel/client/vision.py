"""Image classification clients: image batches and the classifier eval loop.

The personalized part of an image client is its LoRA adapter on the attention projections
*and* the classification head (peft ``modules_to_save``): the head is an ordinary array of
the adapter, so every strategy treats it like the LoRA arrays (FedBip weighs it with the
same similarity weights — FedBip-L with the head's own — FedAvg averages it, local keeps it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from fedbilevel import protocol
from fedbilevel.client.evaluate import Rows, autocast_bf16
from fedbilevel.client.metrics import macro_f1
from fedbilevel.data.digits import ImageExample


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
    rows: Rows | None = None,
) -> dict[str, float | list[float]]:
    """Accuracy and macro F1 of the model's predictions on ``examples``.

    Returns ``accuracy``, ``macro_f1`` (over the classes present in the labels or the
    predictions), ``items-accuracy`` (1.0 / 0.0 per example, for intervals over items) and
    ``eval-seconds``. ``rows``, if given, is entered around each batch's forward pass with the
    batch's indices (FedDPA's per-item adapter weights).
    """
    if not examples:
        raise ValueError("examples: a client needs at least one test example")
    started = time.time()
    codec = ImageCodec()
    predictions: list[int] = []
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = codec.collate(codec.encode(chunk))
        setting = nullcontext() if rows is None else rows(range(start, start + len(chunk)))
        with setting, autocast_bf16(device, bf16_autocast):
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        predictions += logits.argmax(dim=-1).tolist()
    labels = [example.label for example in examples]
    correct = [float(p == y) for p, y in zip(predictions, labels)]
    return {
        "accuracy": sum(correct) / len(correct),
        "macro_f1": macro_f1(labels, predictions),
        f"{protocol.ITEMS_PREFIX}accuracy": correct,
        protocol.EVAL_SECONDS: time.time() - started,
    }
