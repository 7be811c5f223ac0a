"""Alignment strategies. Importing this package registers every strategy module in it."""

import importlib
import pkgutil

from aligner.strategies.base import (
    KeepAlive,
    Strategy,
    StrategyContext,
    StrategyLimits,
    StrategyParamError,
    StrategyParams,
    StrategyResult,
    StrategyUnavailable,
    describe_strategies,
    get_strategy,
    register,
    strategy_names,
)

_SUPPORT_MODULES = {"base", "common", "selection", "pipeline", "chat_calls", "templates", "route", "stops"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KeepAlive",
    "Strategy",
    "StrategyContext",
    "StrategyLimits",
    "StrategyParamError",
    "StrategyParams",
    "StrategyResult",
    "StrategyUnavailable",
    "describe_strategies",
    "get_strategy",
    "register",
    "strategy_names",
]
