"""An offline domain-shift image federation: scikit-learn's 8×8 digits under four transforms.

The 1,797 bundled images (no download) are split once, with a fixed seed that does not
depend on the run seed, into a *pretraining* set of clean images (what the foundation
model :data:`fedbilevel.models.zoo.DIGITS_VIT` is pretrained on) and a *federation* pool.
Each domain applies one deterministic transform to the whole pool — ``inverted``,
``rotated`` (90°), ``noisy`` (Gaussian noise, σ 0.3), ``blurred`` (3×3 box) — and the
clients of a domain split its images IID, then train/test. With 8 clients: domains
0, 0, 1, 1, 2, 2, 3, 3 (contiguous groups, as the synthetic text tasks), about 540 images
a client. Clients of one domain should find each other; clients of different domains share
the labels but not the pixels' statistics, like OfficeHome's Art / Clipart / Product / Real.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from sklearn.datasets import load_digits

from fedbilevel.data.types import ClientData, ImageExample

DIGIT_DOMAINS = ("inverted", "rotated", "noisy", "blurred")
NUM_CLASSES = 10
PRETRAIN_FRACTION = 0.4
_SPLIT_SEED = 20240607  # fixed: the pretrained model and the pool never depend on the run seed
_NOISE_SIGMA = 0.3


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as float32 in [0, 1], shape (n, 8, 8), and their labels."""
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the pretraining set and of the federation pool (fixed, disjoint)."""
    images, _ = _digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    cut = round(PRETRAIN_FRACTION * len(images))
    return np.sort(order[:cut]), np.sort(order[cut:])


def pretraining_set() -> tuple[np.ndarray, np.ndarray]:
    """Clean images (n, 1, 8, 8) and labels that the foundation model is pretrained on."""
    images, labels = _digits()
    index, _ = _split()
    return images[index][:, None], labels[index]


def transform(images: np.ndarray, domain: str) -> np.ndarray:
    """``images`` (n, 8, 8) in [0, 1] as seen in ``domain``; deterministic, float32 in [0, 1]."""
    if domain == "inverted":
        out = 1.0 - images
    elif domain == "rotated":
        out = np.rot90(images, k=1, axes=(1, 2))
    elif domain == "noisy":
        noise = np.random.default_rng([_SPLIT_SEED, 1]).normal(0.0, _NOISE_SIGMA, size=images.shape)
        out = np.clip(images + noise, 0.0, 1.0)
    elif domain == "blurred":
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = (
            sum(padded[:, dy : dy + images.shape[1], dx : dx + images.shape[2]] for dy in range(3) for dx in range(3))
            / 9.0
        )
    else:
        raise ValueError(f"domain: {domain!r} is not allowed; choose one of {', '.join(DIGIT_DOMAINS)}")
    return np.ascontiguousarray(out, dtype=np.float32)


def domain_of_client(partition_id: int, num_partitions: int, domains: Sequence[str] = DIGIT_DOMAINS) -> str:
    """Contiguous groups: domain index ``partition_id * len(domains) // num_partitions``."""
    return domains[partition_id * len(domains) // num_partitions]


def make_digits_client_data(
    partition_id: int,
    num_partitions: int,
    *,
    seed: int,
    test_fraction: float = 0.25,
    domains: Sequence[str] = DIGIT_DOMAINS,
) -> ClientData:
    """Client ``partition_id``'s train and test images.

    Parameters
    ----------
    partition_id, num_partitions : int
        ``0 <= partition_id < num_partitions``; at least one client a domain.
    seed : int
        Run seed: which pool images each client of a domain gets and which are test.
    test_fraction : float
        Share of a client's images held out for its test split, in (0, 1).
    domains : sequence of str
        Domains in client order (each one of :data:`DIGIT_DOMAINS`).

    Returns
    -------
    ClientData
        ``task`` is the domain.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id: value {partition_id} is not allowed; expected 0 <= partition-id < {num_partitions}"
        )
    if num_partitions < len(domains):
        raise ValueError(
            f"num-partitions: value {num_partitions} is not allowed with {len(domains)} domains; "
            "expected at least one client a domain"
        )
    if not 0 < test_fraction < 1:
        raise ValueError(f"test-fraction: value {test_fraction!r} is not allowed; expected a number in (0, 1)")
    domain = domain_of_client(partition_id, num_partitions, domains)
    peers = [p for p in range(num_partitions) if domain_of_client(p, num_partitions, domains) == domain]
    images, labels = _digits()
    _, pool = _split()
    shuffled = np.random.default_rng([seed, domains.index(domain)]).permutation(pool)
    mine = np.sort(np.array_split(shuffled, len(peers))[peers.index(partition_id)])
    pixels = transform(images[mine], domain)[:, None]
    examples = [ImageExample(pixels[i], int(labels[mine[i]]), domain) for i in range(len(mine))]
    order = np.random.default_rng([seed, partition_id, 1]).permutation(len(examples))
    cut = round(test_fraction * len(examples))
    test = [examples[i] for i in np.sort(order[:cut])]
    train = [examples[i] for i in np.sort(order[cut:])]
    return ClientData(domain, train, test)
