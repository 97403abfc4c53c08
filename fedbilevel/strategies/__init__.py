"""Strategy registry and presets: run-config ``strategy`` name -> factory.

A factory takes the validated :class:`~fedbilevel.config.RunConfig` plus the keyword
arguments every personalized strategy accepts (``initial_adapter``, ``min_nodes``, ...)
and returns a Flower ``Strategy``; it passes the strategy its own settings component. New
strategies register here (and declare their options in their module); nothing else changes.
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

# Named FedBip presets (issue 7): strategy -> (the FedBip strategy it runs, the run-config
# keys it sets). The values were chosen from the weighting ablation in docs/BENCHMARKS.md;
# RunConfig sets them (refusing a conflicting choice), so a preset's factory is its base's.
FEDBIP_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedbip-plus": ("fedbip", {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}),
    "fedbip-plus-l": ("fedbip-l", {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}),
}


def register(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Decorator: register a factory ``(config, **common) -> Strategy`` under ``name``."""

    def add(factory: StrategyFactory) -> StrategyFactory:
        if name in _REGISTRY:
            raise ValueError(f"strategy: {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, in registration order."""
    return tuple(_REGISTRY)


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


@register("fedbip")
def _fedbip(config: RunConfig, **common: Any) -> Strategy:
    return FedBip(layerwise=False, settings=config.fedbip, **common)


@register("fedbip-l")
def _fedbip_l(config: RunConfig, **common: Any) -> Strategy:
    return FedBip(layerwise=True, settings=config.fedbip, **common)


@register("local")
def _local(config: RunConfig, **common: Any) -> Strategy:
    return LocalOnly(**common)


@register("fedavg")
def _fedavg(config: RunConfig, **common: Any) -> Strategy:
    return FedAvg(**common)


@register("fedprox")
def _fedprox(config: RunConfig, **common: Any) -> Strategy:
    return FedProx(proximal_mu=config.fedprox.mu, **common)


@register("fedamp")
def _fedamp(config: RunConfig, **common: Any) -> Strategy:
    return FedAmp(**vars(config.fedamp), **common)


@register("fedala")
def _fedala(config: RunConfig, **common: Any) -> Strategy:
    return FedAla(ala=config.fedala, **common)


@register("fedsa-lora")
def _fedsa_lora(config: RunConfig, **common: Any) -> Strategy:
    return FedSaLora(**common)


@register("ffa-lora")
def _ffa_lora(config: RunConfig, **common: Any) -> Strategy:
    return FfaLora(**common)


@register("feddpa")
def _feddpa(config: RunConfig, **common: Any) -> Strategy:
    return FedDpa(settings=config.feddpa, **common)


@register("cluster-oracle")
def _cluster_oracle(config: RunConfig, **common: Any) -> Strategy:
    return ClusterOracle(**common)


for _preset, (_base, _) in FEDBIP_PRESETS.items():
    register(_preset)(_REGISTRY[_base])
