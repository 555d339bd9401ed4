"""Command-line flags generated from the method config dataclasses, so no recipe keeps a hand-made copy.

Every settable field ``f`` of a method ``m`` becomes ``--<m>-<f>`` (``--pmod-beta``, ``--mod-ratio``,
``--gamma-mod-skip-ratio``, ``--fastv-keep``), with the field's help; its destination (and its key in a YAML
recipe) is ``<m>_<f>`` (``pmod_beta``). Values are read as everywhere else (``pmod.core.config.config_from_settings``,
by the field's type): lists are comma-separated, ``none`` marks a dense layer in a ratio list.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from pmod.core.config import (
    MethodConfig,
    config_from_settings,
    given_settings,
    method_class,
    method_names,
    settable_fields,
    setting_key,
    setting_keys,
)
from pmod.core.errors import UserError

DENSE = "dense"


def flag(key: str) -> str:
    """The flag of a ``<method>_<field>`` setting: ``--fastv-keep``, ``--gamma-mod-skip-ratio``."""
    return "--" + key.replace("_", "-")


def add_method_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    methods: Iterable[str] | None = None,
    suppress: bool = False,
) -> None:
    """Add ``--<method>-<field>`` for every settable field of ``methods`` (default: all registered methods).

    With ``suppress`` unset flags are left out of the namespace (so a recipe file can supply them); otherwise they
    are None.
    """
    for method in methods or method_names():
        cls = method_class(method)
        group = parser.add_argument_group(f"{method} settings", cls.paper) if hasattr(parser, "add_argument_group") \
            else parser  # fmt: skip
        for f in settable_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # a list default (PyramidDrop's layers)
                default = ",".join(map(str, f.default_factory()))
            key = setting_key(method, f.name)
            group.add_argument(
                flag(key),
                dest=key,
                default=argparse.SUPPRESS if suppress else None,
                metavar=f.name.upper(),
                help=f"{f.metadata.get('help', '')} (default: {default})",
            )


def method_settings(values: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The fields of ``method`` given in ``values`` (flag destinations, e.g. from a namespace or a recipe)."""
    return given_settings(values, method)


def given_method_flags(values: Mapping[str, Any]) -> dict[str, str]:
    """Every method-flag destination present in ``values`` -> the method it belongs to."""
    return {key: method for method in method_names() for key in setting_keys(method) if values.get(key) is not None}


def build_config(method: str, settings: Mapping[str, Any], base: MethodConfig | None = None) -> MethodConfig:
    """A method config from field values given as text or as YAML/JSON values, on top of ``base`` (default: the
    method's defaults); a :class:`UserError` names the flag and the fix when a value cannot be read or the config
    refuses it."""
    return config_from_settings(method, settings, base, label=flag)


def config_from_values(
    values: Mapping[str, Any], method: str, base: MethodConfig | None = None
) -> MethodConfig | None:
    """The config of ``method`` (None for ``dense``) from flag values, on top of ``base`` when it is a config of
    the same method; flags of other methods are an error."""
    known = [DENSE, *method_names()]
    if method not in known:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(known)}")
    strays = {key: owner for key, owner in given_method_flags(values).items() if owner != method}
    if strays:
        key, owner = next(iter(strays.items()))
        raise UserError(
            f"{flag(key)} is a setting of method {owner}, but the method is {method}; pass --method {owner}"
        )
    if method == DENSE:
        return None
    same = base if base is not None and base.method == method else None
    return build_config(method, method_settings(values, method), same)


def training_free_methods() -> list[str]:
    """The methods with nothing to train (FastV): the ones a command can apply to a dense folder as it loads."""
    return [name for name in method_names() if not method_class(name).trainable]


def add_on_the_fly_arguments(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the settings of the training-free methods, for commands that load a model folder
    (``pmod generate``, ``pmod viz``): the method is applied to a dense folder as it loads, like ``pmod eval``'s
    ``method=``."""
    free = training_free_methods()
    parser.add_argument(
        "--method",
        metavar="METHOD",
        help=f"apply a training-free method ({', '.join(free)}) to a dense model folder as it loads, with its "
        f"settings below; a routed folder runs its own method and refuses --method",
    )
    add_method_arguments(parser, free)


def on_the_fly_config(values: Mapping[str, Any]) -> MethodConfig | None:
    """The config of ``--method`` (None without it) from the flags of :func:`add_on_the_fly_arguments`; a method
    with routers to train, an unknown one, or settings without their ``--method`` are a :class:`UserError`."""
    method = values.get("method")
    free = training_free_methods()
    if method is not None and method not in (DENSE, *free):
        if method in method_names():
            raise UserError(f"--method {method} has routers that must be trained first (pmod train --method "
                            f"{method}, then pass that folder); only {', '.join(free)} applies on the fly")  # fmt: skip
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(free)}")
    return config_from_values(values, method or DENSE)
