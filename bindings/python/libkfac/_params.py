"""The parameter table, read from the library at import (``kfac_param_list`` and
``kfac_param_get_info``): every parameter's number, name, type, family, bounds, default and when
a change takes effect. Nothing in the Python package restates a default or a bound; the numpy
:class:`~libkfac.Optimizer`'s properties and :mod:`libkfac.torch`'s defaults come from here.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Dict, Union

from . import _convert, _lib
from ._errors import check

__all__ = ["PARAMETERS", "Parameter"]

_TYPES = {_lib.KFAC_PARAM_TYPE_DOUBLE: "double", _lib.KFAC_PARAM_TYPE_INT: "int"}
_FAMILIES = {
    _lib.KFAC_FAMILY_CORE: "core",
    _lib.KFAC_FAMILY_ADAPTIVE: "adaptive",
    _lib.KFAC_FAMILY_GAUSS_NEWTON: "gauss_newton",
    _lib.KFAC_FAMILY_EKFAC: "ekfac",
    _lib.KFAC_FAMILY_DISTRIBUTED: "distributed",
}
_EFFECTS = {
    _lib.KFAC_EFFECT_IMMEDIATE: "immediate",
    _lib.KFAC_EFFECT_NEXT_STEP: "next_step",
    _lib.KFAC_EFFECT_NEXT_INVERSION: "next_inversion",
    _lib.KFAC_EFFECT_NEXT_RECORD: "next_record",
}
_EFFECT_TEXT = {
    "immediate": "by the next call that uses it",
    "next_step": "at the next step()",
    "next_inversion": "at the next inverse update",
    "next_record": "by the next record call",
}


@dataclass(frozen=True)
class Parameter:
    """One row of the library's parameter table (``kfac_param_info``)."""

    #: The ``kfac_param`` number, e.g. ``libkfac.KFAC_PARAM_DAMPING``.
    id: int
    #: The lower_snake_case name, e.g. ``"damping"`` (the Optimizer property).
    name: str
    #: ``"double"`` or ``"int"``: which of the library's setters and getters it takes.
    type: str
    #: ``"core"``, ``"adaptive"``, … (``kfac_family``; ``"family_<n>"`` for one unknown here).
    family: str
    #: Bounds (exact for int parameters; ``±inf`` = unbounded on that side).
    lower: Union[int, float]
    upper: Union[int, float]
    lower_inclusive: bool
    upper_inclusive: bool
    #: The value of a new handle, in the library's representation (a number).
    default: Union[int, float]
    #: When a change takes effect: ``"immediate"``, ``"next_step"``, ``"next_inversion"``,
    #: ``"next_record"``.
    effect: str

    def contains(self, value) -> bool:
        """Whether the library accepts ``value`` (a number) for this parameter."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value >= self.lower if self.lower_inclusive else value > self.lower
        below = value <= self.upper if self.upper_inclusive else value < self.upper
        return above and below

    @property
    def python_default(self):
        """The default as :meth:`libkfac.Optimizer.get_param` returns it (a float, an int, a bool
        for ``pi_damping``, a name for the enum-valued parameters)."""
        return to_python(self.name, self.default)

    def describe(self) -> str:
        """E.g. ``"double in (0, inf), default 0.001; core; takes effect at the next step()"``."""
        def bound(value):
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)

        interval = (("[" if self.lower_inclusive else "(") + f"{bound(self.lower)}, {bound(self.upper)}"
                    + ("]" if self.upper_inclusive else ")"))
        effect = _EFFECT_TEXT.get(self.effect, self.effect)
        return (f"{self.type} in {interval}, default {self.python_default!r}; family {self.family}; "
                f"takes effect {effect}")


def to_python(name: str, value):
    """A parameter's library value as the numpy API returns it."""
    if name in _convert.BOOL_PARAMETERS:
        return bool(value)
    for symbol, code in _convert.ENUM_PARAMETERS.get(name, {}).items():
        if code == value:
            return symbol
    return value


def _read_table() -> Dict[str, Parameter]:
    count = ctypes.c_int32()
    check(_lib.kfac_param_list(None, 0, ctypes.byref(count)), None, "kfac_param_list")
    ids = (ctypes.c_int32 * max(count.value, 1))()
    check(_lib.kfac_param_list(ids, count.value, ctypes.byref(count)), None, "kfac_param_list")
    table = {}
    for param in ids[: count.value]:
        info = _lib.kfac_param_info.new()
        check(_lib.kfac_param_get_info(param, ctypes.byref(info)), None, f"kfac_param_get_info({param})")
        kind = _TYPES.get(info.type)
        if kind is None:
            raise ImportError(f"libkfac: parameter {param} has type {info.type}, unknown to these bindings")
        exact = int if kind == "int" else float

        def number(value):
            return value if math.isinf(value) else exact(value)

        name = info.name.decode("ascii")
        table[name] = Parameter(
            id=int(param),
            name=name,
            type=kind,
            family=_FAMILIES.get(info.family, f"family_{info.family}"),
            lower=number(info.lower),
            upper=number(info.upper),
            lower_inclusive=bool(info.lower_inclusive),
            upper_inclusive=bool(info.upper_inclusive),
            default=exact(info.default_value),
            effect=_EFFECTS.get(info.effect, f"effect_{info.effect}"),
        )
    return table


#: Every parameter of the loaded library by name, in the order of their numbers.
PARAMETERS: Dict[str, Parameter] = _read_table()
#: The same, by ``kfac_param`` number.
BY_ID: Dict[int, Parameter] = {p.id: p for p in PARAMETERS.values()}
