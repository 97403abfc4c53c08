"""Strategy registry: run-config ``strategy`` name -> factory.

A factory takes the validated :class:`~fedbilevel.config.RunConfig` plus the keyword
arguments every personalized strategy accepts (``initial_adapter``, ``min_nodes``, ...)
and returns a Flower ``Strategy``. New strategies register here; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.serverapp.strategy import Strategy

if TYPE_CHECKING:
    from fedbilevel.config import RunConfig

StrategyFactory = Callable[..., Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}


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
        raise ValueError(f"run-config key 'strategy': value {config.strategy!r} is not allowed; choose one of {', '.join(_REGISTRY)}")
    common = {"min_nodes": config.min_nodes, "min_available_fraction": config.min_available_fraction, **common}
    return _REGISTRY[config.strategy](config, **common)


def _fedbip_options(config: RunConfig) -> dict[str, Any]:
    from fedbilevel.weighting import Weighting

    weighting = Weighting(
        rule=config.weighting,
        negative=config.negative_cosine,
        temperature=config.weighting_temperature,
        power=config.weighting_power,
        top_k=config.weighting_top_k,
        threshold=config.weighting_threshold,
        z_temperature=config.weighting_z_temperature,
        centering=config.similarity_centering,
        self_floor=config.self_weight_floor,
    )
    return {
        "task_vector": config.task_vector,
        "layer_grouping": config.layer_grouping,
        "similarity_space": config.similarity_space,
        "weighting": weighting,
        "similarity_ema": config.similarity_ema,
    }


@register("fedbip")
def _fedbip(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.fedbip import FedBip

    return FedBip(layerwise=False, **_fedbip_options(config), **common)


@register("fedbip-l")
def _fedbip_l(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.fedbip import FedBip

    return FedBip(layerwise=True, **_fedbip_options(config), **common)


@register("local")
def _local(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.local import LocalOnly

    return LocalOnly(**common)


@register("fedavg")
def _fedavg(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.fedavg import FedAvg

    return FedAvg(**common)


@register("fedprox")
def _fedprox(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.fedprox import FedProx

    return FedProx(proximal_mu=config.proximal_mu, **common)


@register("fedamp")
def _fedamp(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.fedamp import FedAmp

    return FedAmp(
        proximal_lambda=config.fedamp_lambda,
        sigma=config.fedamp_sigma,
        self_weight=config.fedamp_self_weight,
        **common,
    )


@register("fedala")
def _fedala(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.protocol import AlaSettings
    from fedbilevel.strategies.fedala import FedAla

    settings = AlaSettings(
        eta=config.fedala_eta,
        data_fraction=config.fedala_data_fraction,
        top_fraction=config.fedala_top_fraction,
        start_epochs=config.fedala_start_epochs,
    )
    return FedAla(ala=settings, **common)


@register("cluster-oracle")
def _cluster_oracle(config: RunConfig, **common: Any) -> Strategy:
    from fedbilevel.strategies.cluster_oracle import ClusterOracle

    return ClusterOracle(**common)


def _register_presets() -> None:
    """FedBip presets run their base strategy; RunConfig has already set their weighting keys."""
    from fedbilevel.config import FEDBIP_PRESETS

    for name, (base, _) in FEDBIP_PRESETS.items():
        register(name)(_REGISTRY[base])


_register_presets()
