"""The records of a federation: text and image examples, and one client's partition."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    Attributes
    ----------
    instruction : str
        The instruction text shown to the model (without the template).
    output : str
        The reference response.
    task : str
        Identifier of the task that produced the example (e.g. ``"reverse"``).
    """

    instruction: str
    output: str
    task: str


@dataclass(frozen=True)
class ImageExample:
    """One labelled image.

    Attributes
    ----------
    pixels : numpy.ndarray
        float32 ``(channels, height, width)``, what the model's ``pixel_values`` expects.
    label : int
        Class index.
    task : str
        The client's domain (e.g. ``"inverted"``).
    """

    pixels: np.ndarray
    label: int
    task: str


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its task label and its own train and test examples.

    Examples are :class:`Example` (text) or
    :class:`ImageExample` (images), one kind per federation.
    """

    task: str
    train: list[Example] | list[ImageExample]
    test: list[Example] | list[ImageExample]


def data_digest(data: ClientData) -> str:
    """SHA-256 (hex, 16 characters) of a partition's task, train and test examples, in order.

    A resumed run compares it per client: data that changed since the checkpoint would make the
    resumed rounds another experiment.
    """
    digest = hashlib.sha256(data.task.encode())
    for split in (data.train, data.test):
        digest.update(b"\x1d")
        for example in split:
            if isinstance(example, Example):
                digest.update("\x1f".join((example.instruction, example.output, example.task)).encode())
            else:
                digest.update(example.pixels.tobytes() + f"\x1f{example.label}\x1f{example.task}".encode())
            digest.update(b"\x1e")
    return digest.hexdigest()[:16]
