"""The ``digits-vit`` foundation model: a small ViT image classifier pretrained in code.

It is pretrained on the clean pretraining images of scikit-learn's 8×8 digits
(:func:`fedbilevel.data.digits.pretraining_set`), offline and with a fixed seed, so every
process builds the same weights; :mod:`fedbilevel.models.zoo` caches it under the alias
:data:`~fedbilevel.models.zoo.DIGITS_VIT`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from fedbilevel.data.digits import NUM_CLASSES, pretraining_set

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
