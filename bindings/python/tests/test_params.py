"""The parameter table (libkfac._params) read from the library at import, against the table
kfac.h documents in its comments on enum kfac_param (type, bounds, default), the header's bands
(family), and kfac_param_get_info's and kfac_param_list's errors; the numpy properties and the
torch defaults that come from it."""

import ctypes
import inspect
import math
import os
import re

import numpy as np
import pytest

import libkfac
from libkfac import _lib, _params
from testutil import REPO_ROOT

HEADER = os.path.join(REPO_ROOT, "include", "kfac.h") if REPO_ROOT else None
needs_header = pytest.mark.skipif(HEADER is None or not os.path.isfile(HEADER), reason="no kfac.h")


def _number(text):
    """A bound or default as the header writes it: 1e-3, 0.95, ∞, 2^31 − 1, 256."""
    text = text.strip().replace("−", "-")
    if text in ("∞", "inf"):
        return math.inf
    match = re.fullmatch(r"2\^(\d+)\s*-\s*(\d+)", text)
    if match:
        return 2 ** int(match.group(1)) - int(match.group(2))
    return float(text)


def _enum_range(code, enum):
    values = [int(v) for v in re.findall(r"\b\w+\s*=\s*(-?\d+)", re.search(
        r"typedef enum %s\s*\{(.*?)\}" % enum, code, re.S).group(1))]
    return min(values), max(values)


def _documented_table():
    """{name: (type, lower, upper, lower_inclusive, upper_inclusive, default)} from the comment
    before each KFAC_PARAM_* enumerator of kfac.h."""
    with open(HEADER, encoding="utf-8") as file:
        code = file.read()
    body = re.search(r"typedef enum kfac_param\s*\{(.*?)\}\s*kfac_param;", code, re.S).group(1)
    table = {}
    for comment, name in re.findall(r"/\*((?:(?!\*/).)*?)\*/\s*KFAC_PARAM_(\w+)\s*=", body, re.S):
        comment = " ".join(comment.split())
        kind, rest = comment.split(",", 1)
        match = re.match(r"\s*([\[(])([^,\]]+),\s*([^\])]+)([\])]),\s*default\s+([^ .=]+(?:\.\d+)?(?:e-?\d+)?)",
                         rest)
        if match:
            lo_bracket, lower, upper, hi_bracket, default = match.groups()
            lower, upper = _number(lower), _number(upper)
            lower_inclusive, upper_inclusive = lo_bracket == "[", hi_bracket == "]"
        else:
            match = re.match(r"\s*(kfac_\w+|0 or 1),\s*default\s+(\w+)", rest)
            assert match, (name, comment)
            domain, default = match.groups()
            lower, upper = (0, 1) if domain == "0 or 1" else _enum_range(code, domain)
            lower_inclusive = upper_inclusive = True
        default = getattr(_lib, default) if default.startswith("KFAC_") else _number(default)
        table[name.lower()] = (kind.strip(), lower, upper, lower_inclusive, upper_inclusive, default)
    return table


@needs_header
def test_the_table_read_from_the_library_is_the_header_s():
    documented = _documented_table()
    assert len(documented) >= 19
    assert list(_params.PARAMETERS) == sorted(_params.PARAMETERS, key=lambda n: _params.PARAMETERS[n].id)
    assert set(_params.PARAMETERS) == set(documented)
    for name, (kind, lower, upper, lower_inclusive, upper_inclusive, default) in documented.items():
        p = _params.PARAMETERS[name]
        assert p.name == name
        assert p.id == getattr(_lib, "KFAC_PARAM_" + name.upper()), name
        assert p.type == kind, name
        assert (p.lower, p.upper) == (lower, upper), name
        assert (p.lower_inclusive, p.upper_inclusive) == (lower_inclusive, upper_inclusive), name
        assert p.default == default and type(p.default) is (int if kind == "int" else float), name
        if kind == "int":
            assert type(p.lower) is int and type(p.upper) is int, name


def test_families_follow_the_bands_and_effects_are_known():
    for p in _params.PARAMETERS.values():
        assert p.family == ("core" if 1 <= p.id <= 99 else "adaptive" if 200 <= p.id <= 299
                            else "ekfac" if 400 <= p.id <= 499 else "distributed" if 500 <= p.id <= 599 else "?"), p
        assert p.effect in ("immediate", "next_step", "next_inversion", "next_record"), p
    assert _params.PARAMETERS["output_grad_scale"].effect == "next_record"
    assert _params.BY_ID[_lib.KFAC_PARAM_DAMPING] is _params.PARAMETERS["damping"]
    assert libkfac.PARAMETERS is _params.PARAMETERS


def test_defaults_and_bounds_are_what_a_new_handle_has_and_accepts():
    """The table, not a Python copy, decides: each default is a new handle's value; each bound
    is accepted when inclusive and refused (PARAMETER_RANGE) just outside."""
    with libkfac.Optimizer(np.float64) as opt:
        assert opt.params() == {name: p.python_default for name, p in _params.PARAMETERS.items()}
        for p in _params.PARAMETERS.values():
            for bound, inclusive, outward in ((p.lower, p.lower_inclusive, -1), (p.upper, p.upper_inclusive, 1)):
                if math.isinf(bound):
                    continue
                value = int(bound) if p.type == "int" else float(bound)
                if inclusive:
                    opt.set_param(p.name, value)
                    raw = opt.handle.get_int(p.id) if p.type == "int" else opt.handle.get_double(p.id)
                    assert raw == value, p.name
                    outside = value + outward if p.type == "int" else value + outward * max(abs(value), 1.0) * 1e-9
                else:
                    outside = value
                with pytest.raises(libkfac.KFACError) as info:
                    opt.set_param(p.id, outside)
                assert info.value.status == libkfac.KFAC_ERROR_PARAMETER_RANGE, (p.name, outside)
                assert p.contains(value) == inclusive and not p.contains(outside), p.name
            opt.set_param(p.id, p.default)


def test_properties_document_the_table():
    for p in _params.PARAMETERS.values():
        doc = getattr(libkfac.Optimizer, p.name).__doc__
        assert p.describe() in doc and f"default {p.python_default!r}" in doc, p.name


def test_param_get_info_errors():
    info = _lib.kfac_param_info.new()
    for unknown in (0, 14, 99, 100, 199, 207, 1000, -1, 2**31 - 1):
        assert _lib.kfac_param_get_info(unknown, ctypes.byref(info)) == libkfac.KFAC_ERROR_UNKNOWN_PARAMETER
    assert _lib.kfac_param_get_info(_lib.KFAC_PARAM_DAMPING, None) == libkfac.KFAC_ERROR_NULL_POINTER
    small = _lib.kfac_param_info()
    small.struct_size = 4
    assert _lib.kfac_param_get_info(_lib.KFAC_PARAM_DAMPING, ctypes.byref(small)) == libkfac.KFAC_ERROR_INVALID_SIZE
    # An older, smaller struct (up to `family`) is filled as far as it goes.
    older = _lib.kfac_param_info()
    older.struct_size = _lib.kfac_param_info.lower.offset
    older.lower = 7.0
    assert _lib.kfac_param_get_info(_lib.KFAC_PARAM_DAMPING, ctypes.byref(older)) == libkfac.KFAC_OK
    assert older.struct_size == _lib.kfac_param_info.lower.offset
    assert older.name == b"damping" and older.type == libkfac.KFAC_PARAM_TYPE_DOUBLE and older.lower == 7.0
    assert _lib.kfac_param_get_info(_lib.KFAC_PARAM_DAMPING, ctypes.byref(info)) == libkfac.KFAC_OK
    assert info.struct_size == ctypes.sizeof(_lib.kfac_param_info) and info.reserved == 0


def test_param_list_errors_and_partial_copies():
    count = ctypes.c_int32(-1)
    assert _lib.kfac_param_list(None, 0, None) == libkfac.KFAC_ERROR_NULL_POINTER
    assert _lib.kfac_param_list(None, 0, ctypes.byref(count)) == libkfac.KFAC_OK
    assert count.value == len(_params.PARAMETERS)
    ids = (ctypes.c_int32 * 3)(-7, -7, -7)
    assert _lib.kfac_param_list(ids, -1, ctypes.byref(count)) == libkfac.KFAC_ERROR_INVALID_SIZE
    assert _lib.kfac_param_list(ids, 2, ctypes.byref(count)) == libkfac.KFAC_OK
    assert count.value == len(_params.PARAMETERS) and list(ids) == [1, 2, -7]


def test_torch_defaults_are_the_library_s():
    torch_module = pytest.importorskip("libkfac.torch")
    parameters = inspect.signature(torch_module.KFACPreconditioner.__init__).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in parameters.items()
               if name not in ("self", "model"))
    for name in _params.PARAMETERS:
        argument = "lr" if name == "learning_rate" else name
        expected = "mean" if name == "loss_reduction" else None  # PyTorch's losses are means
        assert parameters[argument].default == expected, name
