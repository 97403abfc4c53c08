"""FedDPA's client side: the local adapter beside the global one, its training, the per-input weight.

The strategy (:mod:`fedbilevel.strategies.feddpa`, where the equations are) sends a client its global
adapter and its local one. The process's model holds one adapter ("default"): for a message the
local adapter is added beside it as a second peft adapter (:func:`local_adapter`) and removed
afterwards, since the same model serves every client of the process. While both are on the model,
:class:`Mixer` sets how much each contributes, ``h = W₀x + w_g·ΔW_g x + w_l·ΔW_l x`` at every LoRA
layer and ``w_g·H_g(z) + w_l·H_l(z)`` at an image classifier's head, with one weight pair for the
whole batch or one per item (the instance-wise weights α(x) of the evaluation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from fedbilevel import protocol
from fedbilevel.client.evaluate import autocast_bf16, batches
from fedbilevel.client.train import IGNORE_INDEX, TrainResult, collate, encode_prompt
from fedbilevel.client.vision import ImageCodec
from fedbilevel.data.types import ImageExample
from fedbilevel.models.adapter import get_adapter_arrays, set_adapter_arrays
from fedbilevel.strategies.feddpa import DpaSettings

GLOBAL = "default"  # the peft adapter every strategy trains: FedDPA's global adapter
LOCAL = "local"  # FedDPA's local adapter, on the model within local_adapter() only

Weight = float | torch.Tensor  # one weight for the batch, or one per item (shape (batch,))
T = TypeVar("T")


def _per_row(weight: Weight, like: torch.Tensor) -> Weight:
    """``weight`` broadcastable against ``like`` (batch first): a per-item weight becomes (batch, 1, …)."""
    if isinstance(weight, float):
        return weight
    return weight.to(like.device).view(-1, *([1] * (like.dim() - 1)))


class Mixer:
    """Weights of the global and the local adapter in the model's forward pass (:func:`local_adapter` makes it).

    Every LoRA layer runs both adapters, each scaled by its weight (on top of LoRA's alpha / r);
    an image head's output is the weighted sum of both heads' outputs. The initial weights,
    (1, 0), leave the global adapter alone in effect.
    """

    def __init__(self, model: PeftModel) -> None:
        self.weights: tuple[Weight, Weight] = (1.0, 0.0)
        self._layers = [m for m in model.modules() if isinstance(m, LoraLayer) and LOCAL in m.scaling]
        self._heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper) and LOCAL in m.modules_to_save]
        self._scaling = {m: (m.scaling[GLOBAL], m.scaling[LOCAL]) for m in self._layers}
        self._hooks = []
        for layer in self._layers:
            layer.set_adapter([GLOBAL, LOCAL])  # peft then adds both adapters' updates
            self._hooks.append(layer.register_forward_pre_hook(self._scale))
        for head in self._heads:  # peft runs one head (the global one); the hook adds the local one
            self._hooks.append(head.register_forward_hook(self._mix_head, with_kwargs=True))

    def _scale(self, layer: LoraLayer, args: tuple) -> None:
        (global_weight, local_weight), (global_scaling, local_scaling) = self.weights, self._scaling[layer]
        layer.scaling[GLOBAL] = global_scaling * _per_row(global_weight, args[0])
        layer.scaling[LOCAL] = local_scaling * _per_row(local_weight, args[0])

    def _mix_head(self, head: ModulesToSaveWrapper, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        global_weight, local_weight = self.weights
        local = head.modules_to_save[LOCAL](*args, **kwargs)
        return _per_row(global_weight, output) * output + _per_row(local_weight, local) * local

    @contextmanager
    def weighted(self, global_weight: Weight, local_weight: Weight) -> Iterator[None]:
        """Within the block the forward pass mixes the adapters with these weights (floats, or one per item)."""
        before, self.weights = self.weights, (global_weight, local_weight)
        try:
            yield
        finally:
            self.weights = before

    def freeze_global(self) -> None:
        """From now on only the local adapter (and its head) requires gradients; the global one is frozen.

        :func:`local_adapter` makes the global adapter trainable again when it removes the local one.
        """
        for name, trainable in ((GLOBAL, False), (LOCAL, True)):
            for layer in self._layers:
                layer.lora_A[name].requires_grad_(trainable)
                layer.lora_B[name].requires_grad_(trainable)
            for head in self._heads:
                head.modules_to_save[name].requires_grad_(trainable)

    def close(self) -> None:
        """Remove the hooks and restore LoRA's scaling."""
        for hook in self._hooks:
            hook.remove()
        for layer, (global_scaling, local_scaling) in self._scaling.items():
            layer.scaling[GLOBAL], layer.scaling[LOCAL] = global_scaling, local_scaling


@contextmanager
def local_adapter(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> Iterator[Mixer]:
    """Within the block the model also holds the local adapter ``arrays``, mixed with the global one.

    The model's own adapter ("default") is the global adapter. On leaving the block the local
    adapter is removed and the model is as before: the global adapter alone, trainable, with its
    values (the process's one model serves every client).

    Parameters
    ----------
    model : peft.PeftModel
        The client's model, with the global adapter loaded.
    arrays : mapping of str to numpy.ndarray
        The local adapter under peft's names (:func:`~fedbilevel.models.adapter.get_adapter_arrays`).

    Yields
    ------
    Mixer
        The adapters' weights, (1, 0) until set.

    Raises
    ------
    ValueError
        If ``arrays`` do not match the model's adapter (see :func:`~fedbilevel.models.adapter.set_adapter_arrays`).
    """
    with torch.random.fork_rng(devices=[]):  # peft draws the new adapter's values (overwritten below)
        model.add_adapter(LOCAL, copy.deepcopy(model.peft_config[GLOBAL]))
    model.train(model.training)  # the new adapter's dropout modules are in training mode, whatever the model's
    mixer = None
    try:
        set_adapter_arrays(model, arrays, adapter_name=LOCAL)
        mixer = Mixer(model)
        yield mixer
    finally:
        if mixer is not None:
            mixer.close()
        model.delete_adapter(LOCAL)
        model.set_adapter(GLOBAL)  # active and trainable again, as before the block


def train_local_adapter(
    model: PeftModel, arrays: Mapping[str, np.ndarray], train: Callable[[], TrainResult], *, local_weight: float
) -> tuple[dict[str, np.ndarray], TrainResult]:
    """FedDPA-T's local phase: the local adapter trains on W₀x + (1 − a)·ΔW_g x + a·ΔW_l x, the global one frozen.

    Parameters
    ----------
    model : peft.PeftModel
        The client's model, with the global adapter loaded; it is left as it was.
    arrays : mapping of str to numpy.ndarray
        The local adapter before training, under peft's names.
    train : callable
        Runs the shared training loop on the model's trainable parameters
        (:func:`~fedbilevel.client.train.train_adapter`).
    local_weight : float
        a (``feddpa-local-weight``).

    Returns
    -------
    (dict of str to numpy.ndarray, TrainResult)
        The trained local adapter (float32, peft's names) and the loop's losses.
    """
    with local_adapter(model, arrays) as mixer, mixer.weighted(1.0 - local_weight, local_weight):
        mixer.freeze_global()
        result = train()
        return get_adapter_arrays(model, adapter_name=LOCAL), result


def instance_weights(inputs: torch.Tensor, references: torch.Tensor, *, max_weight: float) -> torch.Tensor:
    """α(x) = β · (1/N) Σⱼ cos(E(x), E(xⱼ)): the global adapter's weight for each input.

    Parameters
    ----------
    inputs : torch.Tensor
        (n, d): the representations E(x) of the inputs to weigh.
    references : torch.Tensor
        (N, d): those of the client's drawn training inputs, N ≥ 1.
    max_weight : float
        β (``feddpa-max-weight``).

    Returns
    -------
    torch.Tensor
        (n,) float32, in [−β, β] (β at an input whose representation points as every reference's).
    """
    cosine = F.normalize(inputs.float(), dim=1) @ F.normalize(references.float(), dim=1).T
    return max_weight * cosine.mean(dim=1)


@torch.no_grad()
def text_representations(
    model: torch.nn.Module,
    tokenizer,
    instructions: Sequence[str],
    *,
    batch_size: int,
    bf16_autocast: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """E(x) of prompts: the last hidden state at the prompt's last token (the official ``emb_type='last'``).

    Each instruction is templated and tokenized as for generation, without its answer.

    Returns
    -------
    torch.Tensor
        (len(instructions), hidden size) float32, on the CPU.
    """
    rows = []
    for batch in batches(list(instructions), batch_size):
        # Right-padded: every row's positions count from its first token; the mask hides the padding.
        encoded = [encode_prompt(tokenizer, instruction) for instruction in batch]
        inputs = collate([(ids, [IGNORE_INDEX] * len(ids)) for ids in encoded], tokenizer.pad_token_id)
        mask = inputs["attention_mask"].to(device)
        with autocast_bf16(device, bf16_autocast):
            hidden = model(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=mask,
                output_hidden_states=True,
                logits_to_keep=1,
            ).hidden_states[-1]
        rows.append(hidden[torch.arange(len(batch), device=device), mask.sum(dim=1) - 1].float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def image_representations(
    model: torch.nn.Module,
    examples: Sequence[ImageExample],
    *,
    batch_size: int,
    bf16_autocast: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """E(x) of images: the [CLS] token's state after the last encoder layer (``hidden_states[-1]``, before the
    final layernorm a ViT's head applies; a cosine of it, as of the text path's last-token state).

    Returns
    -------
    torch.Tensor
        (len(examples), hidden size) float32, on the CPU.
    """
    codec, rows = ImageCodec(), []
    for batch in batches(list(examples), batch_size):
        pixels = codec.collate(codec.encode(batch))["pixel_values"].to(device)
        with autocast_bf16(device, bf16_autocast):
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        rows.append(hidden[:, 0].float().cpu())
    return torch.cat(rows)


def score_dual(
    model: PeftModel,
    arrays: Mapping[str, np.ndarray],
    settings: DpaSettings,
    *,
    training: Sequence[T],
    scored: Sequence[T],
    represent: Callable[[Sequence[T]], torch.Tensor],
    score: Callable[[Callable[[range], AbstractContextManager]], dict],
    seed: int,
) -> dict:
    """The scores of the global and local adapters mixed per scored item by α(x) (instance-wise dynamic weighting).

    N training inputs are drawn (without replacement, from ``seed``) and every representation is
    taken with the local adapter alone, as the official ``get_weight`` does; then each item is
    answered with the global adapter weighted α(x) and the local one 1 − α(x).

    Parameters
    ----------
    model : peft.PeftModel
        The client's model, with the global adapter loaded; it is left as it was.
    arrays : mapping of str to numpy.ndarray
        The local adapter, under peft's names.
    settings : DpaSettings
        N (``instances``) and β (``max_weight``).
    training, scored : sequence
        The client's training items (N are drawn) and the items it scores.
    represent : callable
        Items -> their representations E(x), (items, d) (:func:`text_representations`, :func:`image_representations`).
    score : callable
        ``rows -> scores``: the family's evaluation loop, entering ``rows(indices)`` around its model calls
        on the scored items at those indices (see :func:`~fedbilevel.client.evaluate.evaluate_adapter`).
    seed : int
        Of the draw.

    Returns
    -------
    dict
        The loop's scores, and ``feddpa-mean-weight``: the mean α over the scored items.
    """
    drawn = np.random.default_rng(seed).choice(
        len(training), size=min(settings.instances, len(training)), replace=False
    )
    with local_adapter(model, arrays) as mixer:
        with mixer.weighted(0.0, 1.0):
            references = represent([training[i] for i in drawn])
            inputs = represent(scored)
        alpha = instance_weights(inputs, references, max_weight=settings.max_weight)

        def rows(indices: range) -> AbstractContextManager:
            part = alpha[indices.start : indices.stop]
            return mixer.weighted(part, 1.0 - part)

        scores = score(rows)
    scores[protocol.DPA_MEAN_WEIGHT] = float(alpha.mean())
    return scores
