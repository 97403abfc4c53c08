"""Differential privacy on the client: DP-SGD through Opacus, the clipped and noised update, the accountant.

:mod:`fedbilevel.privacy` states the two modes and their keys. Here they are applied:

* :class:`DpSgd`: one round of DP-SGD (Abadi et al., CCS 2016) inside the one train loop
  (:func:`fedbilevel.client.train.train_adapter`). Opacus's ``GradSampleModule`` computes each
  example's gradient of the trainable parameters (the LoRA factors and an image head are
  ``nn.Linear`` layers, for which Opacus has its own per-example rule; a trainable layer without
  one would go through Opacus's functorch fallback, and one with buffers, or any BatchNorm in the
  model, is refused with one line), and Opacus's ``DPOptimizer`` clips each to C, adds N(0, σ²C²)
  to their sum and divides by the expected batch size before the optimizer's step (``optimizer``).
* :func:`privatize_update`: the clipped and noised update of ``dp = "update"`` (McMahan et al.,
  ICLR 2018, applied by the client; the noise scaled to the sensitivity 2C of replacing the
  client's whole training set).
* :class:`PrivacyAccount`: Opacus's RDP accountant (Mironov, CSF 2017) over every round the client
  released, and :func:`plan`, the per-round mechanism with σ calibrated by Opacus's
  ``get_noise_multiplier``.

Sampling matches the accountant: every optimizer step draws a Poisson sample (each training
example in with probability q, Opacus's ``DPDataLoader`` semantics), the sampled Gaussian
mechanism that RDP accounting assumes; the noisy sum is divided by the *expected* batch size
q·n, so the noise's scale does not depend on the data. A larger sample than one
``batch-size`` is processed in physical chunks whose clipped gradients add up to one step
(Opacus's ``BatchMemoryManager`` protocol).

The randomness of both mechanisms (the Poisson samples and the noise) comes from a generator
seeded from the operating system's entropy, not from the run ``seed``: the server knows the run
seed, and noise it could regenerate would protect nothing. Runs with DP are therefore not
reproducible bit for bit (tests pass a seed).
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from fedbilevel.client.train import IGNORE_INDEX, Codec
from fedbilevel.config import RunConfig
from fedbilevel.options import not_allowed
from fedbilevel.privacy import (
    DP_EPSILON_SPENT,
    DP_HISTORY,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    DP_STOPPED,
    UPDATE_SENSITIVITY,
    PrivacySettings,
    Segment,
    extend,
    flatten,
    unflatten,
)

STATE = "dp-account"  # context.state: this client's account, (σ, q, steps) flattened under DP_HISTORY
CALIBRATION_TOLERANCE = 0.01  # ε: how far below the target the calibrated σ may land (Opacus's default)


@dataclass(frozen=True)
class Mechanism:
    """One round of a client's DP mechanism, as the accountant counts it.

    Attributes
    ----------
    noise_multiplier : float
        σ: the Gaussian noise's standard deviation over the clipping norm.
    sample_rate : float
        q: the Poisson rate of each optimizer step (``dp-sgd``), 1 (``update``).
    steps : int
        Accountant steps per round: ``local-steps`` (``dp-sgd``), 1 (``update``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyAccount:
    """The privacy a client has spent: Opacus's RDP accountant over its (σ, q, steps) history.

    Parameters
    ----------
    history : sequence of (float, float, int)
        Opacus's ``RDPAccountant.history``: (noise multiplier, sample rate, steps) segments.
    delta : float
        δ at which ε is reported.
    """

    def __init__(self, history: Sequence[Segment], *, delta: float) -> None:
        self.history = list(history)
        self.delta = delta

    def epsilon(self, extra: Mechanism | None = None) -> float:
        """ε spent at δ, after one more round of ``extra`` if given (0 before any step)."""
        history = self.history
        if extra is not None:
            history = extend(history, extra.noise_multiplier, extra.sample_rate, extra.steps)
        return _epsilon(tuple(history), self.delta)

    def spend(self, mechanism: Mechanism) -> None:
        """Count one round of ``mechanism``."""
        self.history = extend(self.history, mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[Segment, ...], delta: float) -> float:
    # A tenth of a second or more per history (Opacus sums RDP over 150 orders): once per account state.
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def epsilon_floor(delta: float) -> float:
    """The least ε the RDP accountant reports at ``delta``, however much noise: its RDP → (ε, δ) conversion
    at zero RDP over Opacus's orders (about 0.1 at δ = 1e-5)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    return float(get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)[0])


@functools.lru_cache(maxsize=64)
def plan(
    settings: PrivacySettings,
    *,
    num_examples: int,
    num_clients: int,
    batch_size: int,
    accumulation: int,
    local_steps: int,
    rounds: int,
) -> Mechanism:
    """A client's per-round mechanism, checked against its data; σ calibrated when not set.

    Planned steps: ``rounds`` × ``local_steps`` (``dp-sgd``) or ``rounds`` (``update``), as if the
    client trained in every round (conservative under client sampling: a client sampled less
    spends less).

    Parameters
    ----------
    settings : PrivacySettings
        With ``mode`` other than ``none``.
    num_examples : int
        The client's training examples n (q = min(1, batch_size × accumulation / n)).
    num_clients : int
        The federation's clients (``update``: δ must stay below 1 / clients).
    batch_size, accumulation, local_steps, rounds : int
        ``batch-size``, ``gradient-accumulation-steps``, ``local-steps``, ``num-server-rounds``.

    Returns
    -------
    Mechanism

    Raises
    ------
    fedbilevel.options.ConfigError
        One line naming the key: ``dp-delta`` ≥ 1/n (``dp-sgd``) or ≥ 1/clients (``update``);
        a ``dp-epsilon`` at or below the accountant's floor (:func:`epsilon_floor`), or that no σ up
        to Opacus's 1e6 meets in the planned steps; a ``dp-epsilon`` that the planned steps at the
        given ``dp-noise-multiplier`` exceed.
    """
    if settings.mode == "dp-sgd":
        rate, steps = min(1.0, batch_size * accumulation / num_examples), local_steps
        units, unit = num_examples, "this client's training examples"
    else:
        rate, steps, units, unit = 1.0, 1, num_clients, "the federation's clients"
    if settings.delta >= 1 / units:
        raise not_allowed(
            "dp-delta", settings.delta, f"expected less than 1/{units}, one over {unit}, with dp={settings.mode!r}"
        )
    sigma = settings.noise_multiplier
    floor = epsilon_floor(settings.delta)
    if settings.epsilon and settings.epsilon <= floor:
        raise not_allowed(
            "dp-epsilon",
            settings.epsilon,
            f"the RDP accountant reports at least ε {floor:.4g} at dp-delta {settings.delta:g} however much noise; "
            "expected a larger dp-epsilon or dp-delta",
        )
    if sigma == 0:
        try:
            sigma = get_noise_multiplier(
                target_epsilon=settings.epsilon,
                target_delta=settings.delta,
                sample_rate=rate,
                steps=rounds * steps,
                accountant="rdp",
                epsilon_tolerance=CALIBRATION_TOLERANCE,
            )
        except ValueError as error:  # Opacus: "The privacy budget is too low." (σ would pass 1e6)
            raise not_allowed(
                "dp-epsilon",
                settings.epsilon,
                f"no noise multiplier up to 1e6 meets it at dp-delta {settings.delta:g} over {rounds} rounds × {steps} "
                f"steps at sample rate {rate:.4g}; expected a larger dp-epsilon, or fewer num-server-rounds or steps",
            ) from error
    mechanism = Mechanism(noise_multiplier=float(sigma), sample_rate=rate, steps=steps)
    if settings.epsilon > 0 and settings.noise_multiplier > 0:  # a set σ: the plan must fit the budget
        planned = PrivacyAccount([(float(sigma), rate, rounds * steps)], delta=settings.delta).epsilon()
        if planned > settings.epsilon:
            raise not_allowed(
                "dp-epsilon",
                settings.epsilon,
                f"at dp-noise-multiplier {sigma:g} the planned {rounds} rounds × {steps} steps at sample rate "
                f"{rate:.4g} spend ε {planned:.3f}; expected at least that, or a larger dp-noise-multiplier, fewer "
                "num-server-rounds or steps, or dp-noise-multiplier = 0 (calibrated to dp-epsilon)",
            )
    return mechanism


def per_example_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Each example's own loss: an image's cross-entropy, or the mean over a text's labelled tokens.

    DP-SGD needs each example's gradient to depend on that example only: a batch's token-mean
    loss (a causal LM's own ``loss``) weights an example by the batch's total token count, so the
    text loss here is a mean per example (for answers of equal length, the same thing).
    """
    logits = outputs.logits.float()
    if labels.dim() == 1:  # one class per image
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]  # a causal LM predicts the next token
    token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    targets = labels != IGNORE_INDEX
    return (token * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1)


class DpSgd:
    """One round of DP-SGD in the train loop: Poisson batches, per-example clipping, Gaussian noise.

    Parameters
    ----------
    noise_multiplier : float
        σ.
    max_grad_norm : float
        C, each example's gradient clipped to it.
    sample_rate : float
        q, each example's probability of being in a step's batch.
    seed : int, optional
        Of the samples and the noise; None (the client's way): the operating system's entropy.
    """

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, sample_rate: float, seed: int | None = None):
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.seed = secrets.randbits(63) if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)  # of the Poisson samples
        self.module: GradSampleModule | None = None  # while attached
        self.optimizer: DPOptimizer | None = None
        self._extra_loss = 0.0  # the last step's extra_loss (data-independent, added after the noise)

    @contextmanager
    def attach(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
        max_grad_norm: float = 0.0,
    ) -> Iterator[DpSgd]:
        """Within the block, :meth:`step` trains ``model`` (in training mode) privately with ``optimizer``.

        ``extra_loss`` (e.g. FedProx's proximal term) and the global clipping to ``max_grad_norm``
        do not touch the data, so they apply after the noise (post-processing, no privacy cost).
        The model serves every client of its process: the hooks and Opacus's per-parameter
        attributes are removed when the block ends, also when it raises.

        Raises
        ------
        fedbilevel.options.ConfigError
            One line naming ``dp`` when Opacus cannot give per-example gradients of the model
            (a BatchNorm, a trainable layer with buffers).
        """
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise not_allowed("dp", "dp-sgd", f"Opacus cannot train this model privately: {_one_line(errors[0])}")
        try:
            module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as error:
            raise not_allowed(
                "dp", "dp-sgd", f"Opacus cannot train this model privately: {_one_line(error)}"
            ) from error
        self.module = module
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        # Opacus draws the noise on the parameters' device, so its generator must live there too.
        noise = torch.Generator(device=parameters[0].device).manual_seed(self.seed + 1)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.sample_rate * num_examples,
            loss_reduction="mean",
            generator=noise,
        )

        def after_noise(_optimizer: DPOptimizer) -> None:
            self._extra_loss = 0.0
            if extra_loss is not None:
                term = extra_loss(model)
                grads = torch.autograd.grad(term, parameters, allow_unused=True)
                for parameter, grad in zip(parameters, grads):
                    if grad is not None:
                        parameter.grad += grad
                self._extra_loss = float(term.detach())
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)

        self.optimizer.attach_step_hook(after_noise)
        try:
            yield self
        finally:
            module.cleanup()  # hooks and grad_sample & co. off the shared model
            for parameter in parameters:
                for name in ("summed_grad", "_processed"):
                    if hasattr(parameter, name):
                        delattr(parameter, name)
                parameter.grad = None
            self.module = self.optimizer = None

    def step(
        self,
        codec: Codec,
        encoded: Sequence[Any],
        *,
        batch_size: int,
        device: torch.device | str,
        bf16_autocast: bool,
    ) -> float:
        """One private optimizer step on a Poisson sample of ``encoded``; the sample's mean loss (0 if empty).

        A sample larger than ``batch_size`` runs in chunks of at most that many examples: each
        chunk's per-example gradients are clipped and added up (Opacus's skipped steps), then one
        noisy step is taken. An empty sample still takes the noisy step the accountant counts.
        """
        optimizer = self.optimizer
        chosen = torch.nonzero(torch.rand(len(encoded), generator=self.generator) < self.sample_rate).flatten().tolist()
        chunks = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
        optimizer.zero_grad(set_to_none=True)
        if not chunks:
            for parameter in optimizer.params:
                parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
            optimizer.step()
            return self._extra_loss
        total = 0.0
        for index, chunk in enumerate(chunks):
            inputs = {key: value.to(device) for key, value in codec.collate([encoded[i] for i in chunk]).items()}
            labels = inputs.pop("labels")
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast):
                outputs = self.module(**inputs)
            losses = per_example_loss(outputs, labels)
            with warnings.catch_warnings():
                # LoRA A's input needs no gradient; PyTorch says so at every backward pass (Opacus needs none).
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                losses.mean().backward()  # "mean": Opacus scales back to each example's own gradient
            total += float(losses.detach().sum())
            # Under bf16 the per-example gradients come out in bf16: clip them in the parameters' float32,
            # so the clipping bound holds to float32 precision.
            for parameter in optimizer.params:
                if isinstance(parameter.grad_sample, list):
                    parameter.grad_sample = [g.to(parameter.dtype) for g in parameter.grad_sample]
                elif parameter.grad_sample is not None:
                    parameter.grad_sample = parameter.grad_sample.to(parameter.dtype)
            if index < len(chunks) - 1:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        return total / len(chosen) + self._extra_loss


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def privatize_update(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    *,
    names: Sequence[str],
    max_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The adapter a client sends under ``dp = "update"``: received + clip(τ, C) + N(0, σ²(2C)²) per coordinate.

    τ = trained − received over ``names`` (the arrays the client trained), clipped to the L2 norm
    ``max_norm`` as a whole (DP-FedAvg's flat clipping, McMahan et al. 2018); every other array
    is sent as received, so nothing the client computed leaves it without noise. The noise is
    σ times the sensitivity 2C (:data:`UPDATE_SENSITIVITY`): any two training sets of the client
    give clipped updates at most 2C apart, and the server sees each client's update alone and knows
    who took part, so add/remove of the client (sensitivity C) is not the relation it can be held to.

    Parameters
    ----------
    received, trained : mapping of str to numpy.ndarray
        The adapter the message was about, and the trained one (same names and shapes).
    names : sequence of str
        The arrays that training may have changed.
    max_norm : float
        C.
    noise_multiplier : float
        σ.
    rng : numpy.random.Generator
        Of the noise.

    Returns
    -------
    dict of str to numpy.ndarray
        In ``trained``'s order and dtypes.
    """
    update = {name: trained[name].astype(np.float64) - received[name] for name in names}
    norm = math.sqrt(sum(float(np.sum(np.square(value))) for value in update.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * UPDATE_SENSITIVITY * max_norm
    sent = {}
    for name, array in trained.items():
        if name in update:
            noisy = received[name] + scale * update[name] + rng.normal(0.0, std, size=array.shape)
            sent[name] = noisy.astype(array.dtype)
        else:
            sent[name] = np.array(received[name], dtype=array.dtype)
    return sent


class ClientPrivacy:
    """A client's DP for one train message: its mechanism, its account and the round's metrics.

    Build it with :meth:`for_message`; the train handler asks :attr:`exhausted` before training,
    passes :meth:`dp_sgd` to the train loop, sends :meth:`release` of the trained adapter and
    reports :meth:`spend`'s metrics.
    """

    def __init__(
        self, settings: PrivacySettings, mechanism: Mechanism, account: PrivacyAccount, seed: int | None = None
    ) -> None:
        self.settings = settings
        self.mechanism = mechanism
        self.account = account
        self.seed = seed

    @classmethod
    def for_message(
        cls,
        config: RunConfig,
        *,
        num_examples: int,
        num_clients: int,
        state: RecordDict,
        declared: Mapping[str, Any],
        seed: int | None = None,
    ) -> ClientPrivacy | None:
        """The client's DP for this train message (None when ``dp = "none"``).

        The account is the one this client holds in ``state`` or the server's copy the message
        declares (``dp-history``), whichever has spent more: a client that lost its state (a
        resumed run) continues its account, and a round the server never accepted still counts.
        """
        settings = config.privacy
        if not settings.enabled:
            return None
        mechanism = plan_for(config, num_examples=num_examples, num_clients=num_clients)
        held = state.config_records.get(STATE)
        candidates = [
            PrivacyAccount(unflatten(list(values)), delta=settings.delta)
            for values in (held.get(DP_HISTORY) if held is not None else None, declared.get(DP_HISTORY))
            if values
        ]
        account = max(candidates, key=PrivacyAccount.epsilon, default=PrivacyAccount([], delta=settings.delta))
        return cls(settings, mechanism, account, seed)

    @property
    def exhausted(self) -> bool:
        """Whether the next round would take ε past ``dp-epsilon`` (never without a budget)."""
        return self.settings.epsilon > 0 and self.account.epsilon(self.mechanism) > self.settings.epsilon

    def dp_sgd(self) -> DpSgd | None:
        """The train loop's private step (``dp-sgd``), else None."""
        if self.settings.mode != "dp-sgd":
            return None
        return DpSgd(
            noise_multiplier=self.mechanism.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            sample_rate=self.mechanism.sample_rate,
            seed=self.seed,
        )

    def release(
        self, received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], *, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """What leaves the client: the clipped and noised update (``update``), else the DP-SGD-trained adapter."""
        if self.settings.mode != "update":
            return dict(trained)
        rng = np.random.default_rng(secrets.randbits(128) if self.seed is None else self.seed)
        return privatize_update(
            received,
            trained,
            names=names,
            max_norm=self.settings.max_grad_norm,
            noise_multiplier=self.mechanism.noise_multiplier,
            rng=rng,
        )

    def spend(self, state: RecordDict) -> dict[str, float]:
        """Count this round, keep the account in ``state``; the reply's DP metrics."""
        self.account.spend(self.mechanism)
        state[STATE] = ConfigRecord({DP_HISTORY: flatten(self.account.history)})
        return self._metrics(steps=self.mechanism.steps, stopped=False)

    def stopped(self) -> dict[str, float]:
        """The reply's DP metrics for a round not trained (:attr:`exhausted`)."""
        return self._metrics(steps=0, stopped=True)

    def describe(self) -> str:
        """The mechanism and the budget, for the log."""
        budget = f"ε ≤ {self.settings.epsilon:g}" if self.settings.epsilon > 0 else "no ε budget"
        return (
            f"dp={self.settings.mode}: σ {self.mechanism.noise_multiplier:.4g}, C {self.settings.max_grad_norm:g}, "
            f"q {self.mechanism.sample_rate:.4g}, {self.mechanism.steps} steps a round; {budget} at δ "
            f"{self.settings.delta:g}; ε spent {self.account.epsilon():.3f}"
        )

    def _metrics(self, *, steps: int, stopped: bool) -> dict[str, float]:
        return {
            DP_EPSILON_SPENT: self.account.epsilon(),
            DP_NOISE_MULTIPLIER: self.mechanism.noise_multiplier,
            DP_SAMPLE_RATE: self.mechanism.sample_rate,
            DP_STEPS: float(steps),
            DP_STOPPED: float(stopped),
        }


def plan_for(config: RunConfig, *, num_examples: int, num_clients: int) -> Mechanism:
    """:func:`plan` with the run config's training keys (also the start-up check of a client's data)."""
    train = config.train
    return plan(
        config.privacy,
        num_examples=num_examples,
        num_clients=num_clients,
        batch_size=train.batch_size,
        accumulation=train.gradient_accumulation_steps,
        local_steps=train.local_steps,
        rounds=config.num_server_rounds,
    )
