"""Strategy registry and presets: run-config ``strategy`` name -> factory.

A factory takes the validated :class:`~fedbilevel.config.RunConfig` plus the keyword
arguments every personalized strategy accepts (``initial_adapter``, ``min_nodes``, ...)
and returns a Flower ``Strategy``; it passes the strategy its own settings component. New
strategies register here, naming that component and whether they read ``aggregation-weights``
(tuning and the comparison tables read both from here), and declare their options in their
module; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.serverapp.strategy import Strategy

from fedbilevel.strategies.cluster_oracle import ClusterOracle
from fedbilevel.strategies.fedala import FedAla
from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.feddpa import FedDpa
from fedbilevel.strategies.fedprox import FedProx
from fedbilevel.strategies.fedsa_lora import FedSaLora
from fedbilevel.strategies.ffa_lora import FfaLora
from fedbilevel.strategies.local import LocalOnly

if TYPE_CHECKING:  # the config composes the strategies' settings, so it imports this package
    from fedbilevel.config import RunConfig

StrategyFactory = Callable[..., Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}
# name -> (the RunConfig component holding its own options, or None; whether it reads aggregation-weights)
_TRAITS: dict[str, tuple[str | None, bool]] = {}

# Named FedBip presets (issue 7): strategy -> (the FedBip strategy it runs, the run-config
# keys it sets). The values were chosen from the weighting ablation in docs/BENCHMARKS.md;
# RunConfig sets them (refusing a conflicting choice), so a preset's factory is its base's.
FEDBIP_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedbip-plus": ("fedbip", {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}),
    "fedbip-plus-l": ("fedbip-l", {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}),
}


def register(
    name: str, *, options: str | None = None, averages: bool = False
) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator: register a factory ``(config, **common) -> Strategy`` under ``name``.

    Parameters
    ----------
    name : str
        The run-config ``strategy`` value.
    options : str or None, optional
        The :class:`~fedbilevel.config.RunConfig` field (component) of the strategy's own options, which the
        factory reads; ``None`` when it has none.
    averages : bool, optional
        Whether it averages clients' adapters weighted by ``aggregation-weights``.
    """

    def add(factory: StrategyFactory) -> StrategyFactory:
        if name in _REGISTRY:
            raise ValueError(f"strategy: {name!r} is registered twice")
        _REGISTRY[name] = factory
        _TRAITS[name] = (options, averages)
        return factory

    return add


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, in registration order."""
    return tuple(_REGISTRY)


def strategy_options(name: str) -> str | None:
    """The RunConfig component of strategy ``name``'s own options (``"fedprox"``, ...), ``None`` if it has none.

    Raises
    ------
    KeyError
        ``name`` is not registered.
    """
    return _TRAITS[name][0]


def strategy_averages(name: str) -> bool:
    """Whether strategy ``name`` weighs its means by ``aggregation-weights``.

    Raises
    ------
    KeyError
        ``name`` is not registered.
    """
    return _TRAITS[name][1]


def build_strategy(config: RunConfig, **common: Any) -> Strategy:
    """The strategy named by ``config.strategy``; unknown names list the valid ones."""
    if config.strategy not in _REGISTRY:
        raise ValueError(
            f"run-config key 'strategy': value {config.strategy!r} is not allowed; choose one of {', '.join(_REGISTRY)}"
        )
    common = {
        "min_nodes": config.min_nodes,
        "min_available_fraction": config.min_available_fraction,
        "aggregation_weights": config.aggregation_weights,
        "sampling": config.sampling,
        "seed": config.seed,
        **common,
    }
    return _REGISTRY[config.strategy](config, **common)


@register("fedbip", options="fedbip")
def _fedbip(config: RunConfig, **common: Any) -> Strategy:
    return FedBip(layerwise=False, settings=config.fedbip, **common)


@register("fedbip-l", options="fedbip")
def _fedbip_l(config: RunConfig, **common: Any) -> Strategy:
    return FedBip(layerwise=True, settings=config.fedbip, **common)


@register("local")
def _local(config: RunConfig, **common: Any) -> Strategy:
    return LocalOnly(**common)


@register("fedavg", averages=True)
def _fedavg(config: RunConfig, **common: Any) -> Strategy:
    return FedAvg(**common)


@register("fedprox", options="fedprox", averages=True)
def _fedprox(config: RunConfig, **common: Any) -> Strategy:
    return FedProx(proximal_mu=config.fedprox.mu, **common)


@register("fedamp", options="fedamp")
def _fedamp(config: RunConfig, **common: Any) -> Strategy:
    return FedAmp(**vars(config.fedamp), **common)


@register("fedala", options="fedala", averages=True)
def _fedala(config: RunConfig, **common: Any) -> Strategy:
    return FedAla(ala=config.fedala, **common)


@register("fedsa-lora", averages=True)
def _fedsa_lora(config: RunConfig, **common: Any) -> Strategy:
    return FedSaLora(**common)


@register("ffa-lora", averages=True)
def _ffa_lora(config: RunConfig, **common: Any) -> Strategy:
    return FfaLora(**common)


@register("feddpa", options="feddpa", averages=True)
def _feddpa(config: RunConfig, **common: Any) -> Strategy:
    return FedDpa(settings=config.feddpa, **common)


@register("cluster-oracle")
def _cluster_oracle(config: RunConfig, **common: Any) -> Strategy:
    return ClusterOracle(**common)


for _preset, (_base, _) in FEDBIP_PRESETS.items():
    register(_preset, options=strategy_options(_base), averages=strategy_averages(_base))(_REGISTRY[_base])
