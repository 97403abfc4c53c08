"""Helpers every loader shares: argument checks, seeded subsets and shares, the validation hold-out,
majority answers."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral
from typing import TypeVar

import numpy as np

from fedbilevel.data.types import ClientData, Example
from fedbilevel.options import not_allowed

T = TypeVar("T")
V = TypeVar("V")


def check_int(key: str, value: object, minimum: int) -> int:
    """Return ``value`` as an ``int`` or raise a one-line ``ValueError``."""
    # bool is an Integral, but True as a count is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{key}: {value!r}; allowed: an integer >= {minimum}")
    return int(value)


def check_partition(partition_id: object, num_partitions: object) -> tuple[int, int]:
    num_partitions = check_int("num-partitions", num_partitions, 1)
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, Integral)
        or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"partition-id: {partition_id!r}; allowed: an integer with "
            f"0 <= partition-id < num-partitions ({num_partitions})"
        )
    return int(partition_id), num_partitions


def seeded_subset(items: Sequence[T], n: int | None, seed: int) -> list[T]:
    """``n`` items chosen by ``numpy.random.default_rng(seed)``, in their original order.

    The choice depends only on ``seed`` and ``len(items)`` (the first ``n`` of a seeded
    permutation), so every run and strategy with the same seed evaluates the same items, and a
    smaller ``n`` gives a subset of a larger one.

    Parameters
    ----------
    items : sequence
        The items to choose from.
    n : int or None
        How many to keep; ``None`` or ``n >= len(items)`` keeps all.
    seed : int
        Seed of the permutation.

    Returns
    -------
    list
        The chosen items.
    """
    if n is None or n >= len(items):
        return list(items)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in chosen]


def seeded_share(items: Sequence[T], parts: int, index: int, seed: Sequence[int]) -> list[T]:
    """Share ``index`` of ``parts`` disjoint shares of ``items``, drawn with ``seed``, in original order.

    A permutation drawn by ``numpy.random.default_rng(seed)`` is cut into ``parts`` runs whose
    lengths differ by at most one (:func:`numpy.array_split`), so the shares are disjoint, their
    union is ``items`` and each is an IID sample; ``parts = 1`` returns ``items`` unchanged.

    Parameters
    ----------
    items : sequence
        The items to share out.
    parts : int
        Number of shares, ``1 <= parts <= len(items)`` (so that none is empty).
    index : int
        Which share, ``0 <= index < parts``.
    seed : sequence of int
        Entropy of the permutation (e.g. the run seed and the task): the same seed gives the same
        shares to every client, in every process.

    Returns
    -------
    list
        The share's items.
    """
    order = np.random.default_rng(list(seed)).permutation(len(items))
    return [items[i] for i in np.sort(np.array_split(order, parts)[index])]


# Entropy word of the validation draw, so it is not the stream a loader draws from (seed, partition).
_VALIDATION_STREAM = 0x76616C


def hold_out_validation(data: ClientData, fraction: float, *, seed: int, partition_id: int) -> ClientData:
    """``data`` with round(``fraction`` × its training examples) moved into ``validation``.

    The held-out examples are a seeded draw (``numpy.random.default_rng([seed, partition_id, ·])``,
    the same for every strategy), and both splits keep the loader's order. They come out of the
    training examples only, so validation never shares an example with train or test; ``fraction``
    0 returns ``data`` itself.

    Parameters
    ----------
    data : ClientData
        A loader's partition (its ``validation`` empty).
    fraction : float
        ``val-fraction``, in [0, 1).
    seed : int
        The run seed.
    partition_id : int
        The client's partition (named in the error).

    Returns
    -------
    ClientData
        The partition with its validation split.

    Raises
    ------
    ConfigError
        One line naming ``val-fraction``, the client and the counts, when it would leave the client
        without training or without validation examples.
    """
    if fraction == 0:
        return data
    total = len(data.train)
    held = round(fraction * total)
    if not 0 < held < total:
        left = "validation" if held == 0 else "training"
        raise not_allowed(
            "val-fraction",
            fraction,
            f"client {partition_id} ({data.task}) has {total} training examples, so it would hold out {held} "
            f"and keep {total - held}, leaving no {left} examples; expected a fraction that keeps at least one of each",
        )
    chosen = np.random.default_rng([seed, partition_id, _VALIDATION_STREAM]).permutation(total)[:held]
    mask = np.zeros(total, dtype=bool)
    mask[chosen] = True
    return dataclasses.replace(
        data,
        train=[example for example, out in zip(data.train, mask) if not out],
        validation=[example for example, out in zip(data.train, mask) if out],
    )


def most_common_answer(examples: Sequence[Example], key: Callable[[str], str] | None = None) -> tuple[str, float]:
    """The most frequent output and its share: the majority-answer baseline of a task.

    Parameters
    ----------
    examples : sequence of Example
        At least one example.
    key : callable, optional
        Outputs are counted as ``key(output)``: the scoring's normalisation
        (:func:`fedbilevel.client.metrics.answer_text`), so that ``"yes"``, ``"yes "`` and ``"ｙｅｓ"``
        count as the one answer they are scored as.

    Returns
    -------
    tuple of (str, float)
        The most frequent (keyed) ``output`` (ties: the lexicographically smallest) and the fraction
        of examples that have it.

    Raises
    ------
    ValueError
        If ``examples`` is empty.
    """
    if not examples:
        raise ValueError("most_common_answer: no examples; allowed: at least one example")
    return most_common((key or str)(example.output) for example in examples)


def most_common(values: Iterable[V]) -> tuple[V, float]:
    """The most frequent of ``values`` (ties: the smallest) and its share; at least one value."""
    counts = Counter(values)
    value = min(counts, key=lambda v: (-counts[v], v))
    return value, counts[value] / sum(counts.values())
