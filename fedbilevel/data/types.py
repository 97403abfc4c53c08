"""The records of a federation: text and image examples, and one client's partition."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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


SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its task label and its own train, test and validation examples.

    Examples are :class:`Example` (text) or
    :class:`ImageExample` (images), one kind per federation. ``validation`` holds the
    training examples that ``val-fraction`` keeps out of training (empty by default); the
    three splits never share an example.
    """

    task: str
    train: list[Example] | list[ImageExample]
    test: list[Example] | list[ImageExample]
    validation: list[Example] | list[ImageExample] = field(default_factory=list)

    def split(self, name: str) -> list[Example] | list[ImageExample]:
        """The examples of split ``name``, one of :data:`SPLITS`."""
        if name not in SPLITS:
            raise ValueError(f"split: {name!r} is not allowed; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)


def data_digest(data: ClientData) -> str:
    """SHA-256 (hex, 16 characters) of a partition's task, train, test and validation examples, in order.

    A resumed run compares it per client: data that changed since the checkpoint would make the
    resumed rounds another experiment. An empty validation split adds nothing, so partitions
    without one keep the digests they had before validation splits existed.
    """
    digest = hashlib.sha256(data.task.encode())
    for split in (data.train, data.test, *([data.validation] if data.validation else [])):
        digest.update(b"\x1d")
        for example in split:
            if isinstance(example, Example):
                digest.update("\x1f".join((example.instruction, example.output, example.task)).encode())
            else:
                digest.update(example.pixels.tobytes() + f"\x1f{example.label}\x1f{example.task}".encode())
            digest.update(b"\x1e")
    return digest.hexdigest()[:16]
