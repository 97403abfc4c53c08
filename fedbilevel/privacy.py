"""Differential privacy: the run-config keys, the keys that travel, and the server's copy of each client's account.

Two modes (``dp``), both applied on the client, so the server never sees what they protect:

* ``dp-sgd``: example-level DP-SGD (Abadi et al., CCS 2016) on the trainable parameters (the
  LoRA factors, an image classifier's head): each optimizer step draws a Poisson sample of the
  client's training examples (each one in with probability q = batch-size ×
  gradient-accumulation-steps / examples), clips every example's gradient to
  ``dp-max-grad-norm`` C and adds N(0, σ²C²) to their sum. Protects each training example of a
  client against everything that sees the client's adapters (the server, other clients).
* ``update``: client-level DP on the update (DP-FedAvg's clip and noise, McMahan et al., ICLR
  2018, applied by the client itself): the task vector τ = θ_trained − θ_received is clipped to
  the L2 norm C and N(0, σ²(2C)²) is added to each coordinate before it is sent, so the server
  never sees an un-noised update. Protects a client's whole training set: any two training sets
  of the client (replace-one-client, sensitivity 2C; add/remove would not fit, because the
  server sees each client's update alone and knows who took part).

Each client accounts for its own releases with Opacus's RDP accountant (Mironov, CSF 2017; the
sampled Gaussian mechanism of Mironov, Talwar and Zhang 2019): per optimizer step (σ, q) for
``dp-sgd``, per round it trains (σ, 1) for ``update`` (no amplification by the server's client
sampling is claimed). σ is ``dp-noise-multiplier``, or, when that is 0, calibrated so that
every planned round (num-server-rounds, as if the client trained in each) stays within
``dp-epsilon`` at ``dp-delta``. A client whose next round would exceed ``dp-epsilon`` does not
train: it replies with the adapter it received and ``dp-stopped`` = 1.

This module is pure (no torch, no Flower): the settings, the message and metric keys, and the
:class:`PrivacyLedger` the server keeps. The mechanisms and the accountant live on the client
(:mod:`fedbilevel.client.privacy`, through Opacus).

Keys that travel. Server -> client, train config: ``dp-history``, the server's copy of the
client's account as (σ, q, steps) triples, flattened; a client that lost its own (a resumed run
starts fresh client processes) rebuilds its accountant from it. Client -> server, train
metrics: ``dp-epsilon-spent`` (after this round), ``dp-noise-multiplier``, ``dp-sample-rate``,
``dp-steps`` (accounted this round, 0 when stopped) and ``dp-stopped``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbilevel.options import choice, not_allowed, number, option, validate

MODES = ("none", "dp-sgd", "update")

# Train config, server -> client: the server's copy of the client's account, (σ, q, steps) flattened.
DP_HISTORY = "dp-history"
# Train reply metrics, client -> server.
DP_EPSILON_SPENT = "dp-epsilon-spent"  # ε at dp-delta after this round (everything this client released)
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # σ of this round's mechanism
DP_SAMPLE_RATE = "dp-sample-rate"  # q: Poisson rate per optimizer step (dp-sgd), 1 per round (update)
DP_STEPS = "dp-steps"  # accountant steps this round: local-steps (dp-sgd), 1 (update), 0 when stopped
DP_STOPPED = "dp-stopped"  # 1: the next round would exceed dp-epsilon, so the client did not train

Segment = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps): Opacus's RDP history entry

JOURNAL = "privacy_journal.jsonl"  # in the run folder: every DP train reply the server received, as it arrived
# dp = "update": the clipped update's sensitivity in units of C (any two training sets of a client give
# updates at most 2C apart); the noise is σ times it. Checkpoints record it: a run noised otherwise cannot resume.
UPDATE_SENSITIVITY = 2.0


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy on every client (module docstring; README, "Differential privacy").

    Attributes
    ----------
    mode : str
        ``none``, ``dp-sgd`` (example level) or ``update`` (client level).
    max_grad_norm : float
        C: the clipping norm of each example's gradient (``dp-sgd``) or of the update (``update``).
    noise_multiplier : float
        σ: the noise's standard deviation over C; 0 calibrates it from ``epsilon``.
    epsilon : float
        The (ε, δ) budget no client exceeds (it stops training instead); 0: no budget (then σ is
        set and ε is only reported).
    delta : float
        δ of the reported and targeted ε.
    """

    mode: str = option(
        "dp",
        "none",
        choice(MODES),
        "differential privacy on every client: `dp-sgd` (each example's gradient clipped, noise on their sum: "
        "Opacus), `update` (the update clipped and noised before it is sent) or `none`",
    )
    max_grad_norm: float = option(
        "dp-max-grad-norm",
        1.0,
        number(0.0, low_open=True),
        "DP: clipping norm C of each example's gradient (`dp-sgd`) or of the update's L2 norm (`update`)",
    )
    noise_multiplier: float = option(
        "dp-noise-multiplier",
        0.0,
        number(0.0, low_open=False),
        "DP: σ, the noise's standard deviation over the sensitivity (C for `dp-sgd`, 2C for `update`); 0: "
        "calibrated so that num-server-rounds rounds spend at most `dp-epsilon`",
    )
    epsilon: float = option(
        "dp-epsilon",
        8.0,
        number(0.0, low_open=False),
        "DP: the ε no client exceeds at `dp-delta` (a client whose next round would exceed it stops training); "
        "0: no budget, ε only reported (needs `dp-noise-multiplier`)",
    )
    delta: float = option(
        "dp-delta",
        1e-5,
        number(0.0, low_open=True, high=1.0, high_open=True),
        "DP: δ of ε; below 1/(a client's training examples) for `dp-sgd`, 1/(clients) for `update`",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.enabled and self.noise_multiplier == 0 and self.epsilon == 0:
            raise not_allowed(
                "dp-epsilon",
                self.epsilon,
                f"dp={self.mode!r} needs noise: expected dp-epsilon > 0 (σ calibrated) or dp-noise-multiplier > 0",
            )

    @property
    def enabled(self) -> bool:
        """Whether clients apply a DP mechanism."""
        return self.mode != "none"

    def check_with(self, *, precision: str, gradient_checkpointing: bool, strategy: str) -> None:
        """Refuse settings of other components that DP cannot be applied with (one line naming the keys).

        Raises
        ------
        fedbilevel.options.ConfigError
            ``dp-sgd`` with ``precision='4bit'`` (per-example gradients through bitsandbytes are not
            verified), with ``gradient-checkpointing`` (Opacus's hooks capture a checkpointed layer's
            activations twice and produce no per-example gradient), with ``strategy='fedala'``
            (its mixing weights are learned on the training data without noise), or with
            ``strategy='feddpa'`` (it trains two adapters a round; the accountant counts one training).
        """
        if self.mode != "dp-sgd":
            return
        if precision == "4bit":
            raise not_allowed(
                "precision",
                precision,
                "dp='dp-sgd' is verified with fp32, bf16-autocast and bf16 only (not through bitsandbytes); "
                "expected one of those, or dp='update'",
            )
        if gradient_checkpointing:
            raise not_allowed(
                "gradient-checkpointing",
                gradient_checkpointing,
                "dp='dp-sgd' computes per-example gradients with Opacus's hooks, which see a checkpointed layer "
                "twice; expected false, or dp='update'",
            )
        if strategy == "fedala":
            raise not_allowed(
                "strategy",
                strategy,
                "dp='dp-sgd' cannot cover FedALA's mixing weights, learned on the training data without noise; "
                "expected another strategy, or dp='update'",
            )
        if strategy == "feddpa":
            raise not_allowed(
                "strategy",
                strategy,
                "dp='dp-sgd' accounts for one training a round, and FedDPA trains its local and its global adapter "
                "each round; expected another strategy, or dp='update'",
            )


def flatten(history: Iterable[Segment]) -> list[float]:
    """(σ, q, steps) segments -> [σ₁, q₁, steps₁, σ₂, ...] (a message config holds flat lists)."""
    return [float(value) for segment in history for value in segment]


def unflatten(values: Sequence[float]) -> list[Segment]:
    """The inverse of :func:`flatten`.

    Raises
    ------
    ValueError
        If ``values`` is not a whole number of triples.
    """
    if len(values) % 3:
        raise ValueError(f"{DP_HISTORY}: {len(values)} values; expected (σ, q, steps) triples")
    return [(float(values[i]), float(values[i + 1]), int(values[i + 2])) for i in range(0, len(values), 3)]


def extend(history: Sequence[Segment], noise_multiplier: float, sample_rate: float, steps: int) -> list[Segment]:
    """``history`` with ``steps`` more of (σ, q), merged into the last segment when it has the same σ and q
    (as Opacus's RDP accountant merges its steps)."""
    out = list(history)
    if out and out[-1][:2] == (noise_multiplier, sample_rate):
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + steps)
    elif steps:
        out.append((noise_multiplier, sample_rate, steps))
    return out


def released(metrics: Mapping[str, Any]) -> tuple[Segment, float, bool] | None:
    """A train reply's DP round: ((σ, q, steps), ε spent, stopped), or None when it reports no DP.

    Raises
    ------
    ValueError
        If a DP metric is missing or not a finite number.
    """
    if DP_EPSILON_SPENT not in metrics:
        return None
    keys = (DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE, DP_STEPS, DP_EPSILON_SPENT, DP_STOPPED)
    values = [metrics.get(key) for key in keys]
    for key, value in zip(keys, values):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"train metric '{key}': {value!r}; expected a finite number")
    sigma, rate, steps, spent, stopped = values
    return (float(sigma), float(rate), int(steps)), float(spent), bool(stopped)


class PrivacyLedger:
    """The server's copy of each client's privacy account, from the train replies it received.

    The client's own account (in its Flower ``context.state``) is the authority while its
    SuperNode keeps its state; this copy is checkpointed with the run and sent back in every
    train message (``dp-history``), so a client that lost its state (a resumed run, a
    restarted SuperNode) continues its account instead of starting a fresh one.

    A checkpoint is written at the end of a round, but clients release during it. So each DP
    reply is also appended to a journal (:meth:`attach`, :data:`JOURNAL`) as it arrives, before
    the server uses it, and a resumed run adds the journal's rounds after its checkpoint: a
    crash between a release and the checkpoint, and the replay of that round, both count. A
    reply the server rejected counts too (what it carried was released). Not covered: a reply
    the ServerApp never received (it stopped while that client trained).
    """

    def __init__(self) -> None:
        self.histories: dict[int, list[Segment]] = {}
        self.journal: Path | None = None

    def attach(self, journal: Path) -> None:
        """Append every DP reply to ``journal`` (a run folder's :data:`JOURNAL`) from now on.

        The file is opened for appending at once (created if absent), so one that cannot be written
        fails before any client trains; a last line the server did not finish (no newline) is cut,
        so the next append starts a line of its own.

        Raises
        ------
        OSError
            If ``journal`` cannot be opened for appending.
        """
        self.journal = Path(journal)
        with open(self.journal, "ab+") as handle:
            handle.seek(0)
            text = handle.read()
            if text and not text.endswith(b"\n"):
                handle.truncate(text.rfind(b"\n") + 1)

    def note(self, partition_id: int, metrics: Mapping[str, Any], *, server_round: int) -> str | None:
        """Add a train reply's DP round to the client's account (journal first); the line to log (None
        without DP).

        Raises
        ------
        ValueError
            If the reply's DP metrics are malformed (:func:`released`).
        """
        release = released(metrics)
        if release is None:
            return None
        (sigma, rate, steps), spent, stopped = release
        if stopped:
            return f"stopped training: its next round would exceed dp-epsilon (ε spent {spent:.3f}); adapter kept"
        self._journal(server_round, partition_id, (sigma, rate, steps))
        self.histories[partition_id] = extend(self.histories.get(partition_id, []), sigma, rate, steps)
        return f"ε spent {spent:.3f} (σ {sigma:.4g}, q {rate:.4g}, {steps} steps this round)"

    def config_for(self, partition_id: int) -> dict[str, list[float]]:
        """The train config entry with the client's account (empty before its first DP round)."""
        history = self.histories.get(partition_id)
        return {DP_HISTORY: flatten(history)} if history else {}

    def to_record(self) -> dict[str, list[float]]:
        """For checkpoint.json: partition id -> the flattened account."""
        return {str(partition_id): flatten(history) for partition_id, history in sorted(self.histories.items())}

    def restore(self, record: Mapping[str, Sequence[float]], *, after_round: int = 0) -> int:
        """Continue from :meth:`to_record`'s record of the checkpoint after ``after_round``, plus the
        attached journal's releases of later rounds; returns how many such releases were added.

        A last journal line without its newline (the server stopped while writing it) is ignored
        (:meth:`attach` cuts it).

        Raises
        ------
        ValueError
            If another journal line is not a release.
        """
        self.histories = {int(partition_id): unflatten(values) for partition_id, values in record.items()}
        if self.journal is None or not self.journal.is_file():
            return 0
        added = 0
        for line_number, line in enumerate(self.journal.read_text().splitlines(keepends=True), 1):
            if not line.endswith("\n"):
                break
            try:
                entry = json.loads(line)
                server_round, partition_id = int(entry["round"]), int(entry["partition_id"])
                sigma, rate, steps = float(entry["sigma"]), float(entry["sample_rate"]), int(entry["steps"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.journal}: line {line_number} is not a DP release ({error})") from error
            if server_round > after_round:
                self.histories[partition_id] = extend(self.histories.get(partition_id, []), sigma, rate, steps)
                added += 1
        return added

    def _journal(self, server_round: int, partition_id: int, segment: Segment) -> None:
        if self.journal is None:
            return
        sigma, rate, steps = segment
        line = json.dumps(
            {"round": server_round, "partition_id": partition_id, "sigma": sigma, "sample_rate": rate, "steps": steps}
        )
        with open(self.journal, "a") as journal:
            journal.write(line + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # on disk before the server acts on the reply
