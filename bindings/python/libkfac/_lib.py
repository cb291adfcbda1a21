"""Low-level ctypes bindings of libkfac, mirroring ``include/kfac.h`` one to one, in the
header's order.

Every function declared in the header — the experimental section's too (the library exports
them all; the ``KFAC_EXPERIMENTAL_API`` macro only makes C callers opt in) — is available here
under the same name with its ``argtypes`` and ``restype`` set; every enum value and version
macro is a module constant with the same name; the structs ``kfac_param_info``,
``kfac_dense_desc``, ``kfac_conv2d_desc`` and ``kfac_layer_info`` are :class:`ctypes.Structure`
subclasses. Nothing here checks statuses or converts arrays: that is the job of
:mod:`libkfac._handle` and :class:`libkfac.Optimizer`. ``tests/test_bindings.py`` checks this
module against the header.

The shared library is located, in this order:

1. the environment variable ``KFAC_LIBRARY`` (a full path; if it is set, nothing else is tried);
2. ``libkfac.so`` next to the package (inside the ``libkfac`` directory, where ``pip install``
   puts the library it builds, then beside it);
3. ``<repo>/.build/release/libkfac.so`` where ``<repo>`` is the first directory above the
   package that contains ``Package.swift`` (a source checkout built with
   ``swift build -c release --product kfac``);
4. ``ctypes.util.find_library("kfac")``, then the SONAME (``libkfac.so.0.MINOR`` while the
   major version is 0) through the dynamic loader's ordinary search (``LD_LIBRARY_PATH``,
   ``ldconfig``).

If the dynamic loader refuses a library because a system library it needs is missing (OpenBLAS,
LAPACKE, libstdc++, or a too old glibc), the ``ImportError`` names that library first.

At import the loaded library's ``kfac_version_number()`` is compared with
:data:`KFAC_VERSION_NUMBER`, the version these bindings were written for. Under the header's
compatibility policy a different major version, or while the major version is 0 a different
minor version, has another ABI: :class:`ImportError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint,
    c_uint64,
    c_void_p,
)

# ---------------------------------------------------------------------------------------------
# Version macros (the version of kfac.h these bindings mirror)
# ---------------------------------------------------------------------------------------------

KFAC_VERSION_MAJOR = 0
KFAC_VERSION_MINOR = 2
KFAC_VERSION_PATCH = 0
KFAC_VERSION_STRING = "0.2.0"
KFAC_VERSION_NUMBER = KFAC_VERSION_MAJOR * 10000 + KFAC_VERSION_MINOR * 100 + KFAC_VERSION_PATCH

# ---------------------------------------------------------------------------------------------
# enum kfac_status
# ---------------------------------------------------------------------------------------------

KFAC_OK = 0
KFAC_ERROR_NULL_POINTER = -1
KFAC_ERROR_INVALID_ARGUMENT = -2
KFAC_ERROR_UNKNOWN_PARAMETER = -3
KFAC_ERROR_PARAMETER_TYPE = -4
KFAC_ERROR_PARAMETER_RANGE = -5
KFAC_ERROR_INVALID_SIZE = -10
KFAC_ERROR_SIZE_OVERFLOW = -11
KFAC_ERROR_UNKNOWN_LAYER = -12
KFAC_ERROR_DTYPE_MISMATCH = -13
KFAC_ERROR_NO_STATISTICS = -20
KFAC_ERROR_NO_INVERSES = -21
KFAC_ERROR_LAYERS_FROZEN = -22
KFAC_ERROR_NO_STEP = -23
KFAC_ERROR_NO_SOLVE = -24
KFAC_ERROR_NO_COLUMNS = -25
KFAC_ERROR_NON_FINITE = -30
KFAC_ERROR_NOT_POSITIVE_DEFINITE = -31
KFAC_ERROR_EIGEN_FAILED = -32
KFAC_ERROR_OUT_OF_MEMORY = -40
KFAC_ERROR_UNSUPPORTED = -50
KFAC_ERROR_IO = -60
KFAC_ERROR_BUFFER_TOO_SMALL = -61
KFAC_ERROR_CORRUPT_STATE = -62
KFAC_ERROR_STATE_VERSION = -63
KFAC_ERROR_STATE_MISMATCH = -64
KFAC_ERROR_CALLBACK = -70
KFAC_ERROR_INTERNAL = -99

#: Status value -> constant name, e.g. ``STATUS_NAMES[-12] == "KFAC_ERROR_UNKNOWN_LAYER"``.
STATUS_NAMES = {
    value: name
    for name, value in list(globals().items())
    if name == "KFAC_OK" or name.startswith("KFAC_ERROR_")
}

# ---------------------------------------------------------------------------------------------
# enum kfac_dtype
# ---------------------------------------------------------------------------------------------

KFAC_FLOAT32 = 1
KFAC_FLOAT64 = 2

# ---------------------------------------------------------------------------------------------
# enum kfac_param (banded by family: 1–99 core, 200–299 adaptive, 400–499 EKFAC, 500–599
# distributed), enum kfac_inverse_strategy,
# enum kfac_reduction, enum kfac_param_type, enum kfac_family, enum kfac_param_effect
# ---------------------------------------------------------------------------------------------

KFAC_PARAM_LEARNING_RATE = 1
KFAC_PARAM_DAMPING = 2
KFAC_PARAM_FACTOR_DECAY = 3
KFAC_PARAM_KL_CLIP = 4
KFAC_PARAM_OUTPUT_GRAD_SCALE = 5
KFAC_PARAM_FACTOR_UPDATE_PERIOD = 6
KFAC_PARAM_INVERSE_UPDATE_PERIOD = 7
KFAC_PARAM_INVERSE_STRATEGY = 8
KFAC_PARAM_PI_DAMPING = 9
KFAC_PARAM_LOSS_REDUCTION = 10
KFAC_PARAM_NUM_THREADS = 11
KFAC_PARAM_INVERSE_SPREAD = 12
KFAC_PARAM_ASYNC_INVERSION = 13
KFAC_PARAM_LM_INTERVAL = 200
KFAC_PARAM_LM_DECAY = 201
KFAC_PARAM_FACTOR_DAMPING = 202
KFAC_PARAM_FACTOR_DAMPING_PERIOD = 203
KFAC_PARAM_FACTOR_DAMPING_DECAY = 204
KFAC_PARAM_DAMPING_MIN = 205
KFAC_PARAM_FACTOR_DAMPING_RATIO = 206
KFAC_PARAM_EKFAC_DECAY = 400
KFAC_PARAM_EKFAC_MODE = 401
KFAC_PARAM_DISTRIBUTED_REDUCE = 500

KFAC_INVERSE_CHOLESKY = 0
KFAC_INVERSE_EIGEN = 1
KFAC_INVERSE_EKFAC = 2  # experimental (the header's "EKFAC" section)

KFAC_REDUCTION_SUM = 0
KFAC_REDUCTION_MEAN = 1
KFAC_ASYNC_INVERSION_OFF = 0
KFAC_ASYNC_INVERSION_NEWEST = 1
KFAC_ASYNC_INVERSION_DETERMINISTIC = 2

KFAC_PARAM_TYPE_DOUBLE = 1
KFAC_PARAM_TYPE_INT = 2

KFAC_FAMILY_CORE = 0
KFAC_FAMILY_ADAPTIVE = 2
KFAC_FAMILY_GAUSS_NEWTON = 3
KFAC_FAMILY_EKFAC = 4
KFAC_FAMILY_DISTRIBUTED = 5

KFAC_EFFECT_IMMEDIATE = 0
KFAC_EFFECT_NEXT_STEP = 1
KFAC_EFFECT_NEXT_INVERSION = 2
KFAC_EFFECT_NEXT_RECORD = 3

# ---------------------------------------------------------------------------------------------
# enum kfac_layer_kind, enum kfac_layout, enum kfac_conv_approximation
# ---------------------------------------------------------------------------------------------

KFAC_LAYER_DENSE = 1
KFAC_LAYER_CONV2D = 2

KFAC_LAYOUT_NCHW = 0
KFAC_LAYOUT_NHWC = 1

KFAC_CONV_KFC = 0
KFAC_CONV_SUA = 1

# ---------------------------------------------------------------------------------------------
# enum kfac_distribution (adaptive mode and target samplers)
# ---------------------------------------------------------------------------------------------

KFAC_DIST_CATEGORICAL = 0
KFAC_DIST_BERNOULLI = 1
KFAC_DIST_GAUSSIAN = 2

# ---------------------------------------------------------------------------------------------
# enum kfac_columns_use, enum kfac_activation (experimental: Gauss-Newton products)
# ---------------------------------------------------------------------------------------------

KFAC_COLUMNS_FACTOR = 1
KFAC_COLUMNS_PRODUCT = 2
KFAC_ACTIVATION_IDENTITY = 0
KFAC_ACTIVATION_RELU = 1
KFAC_ACTIVATION_TANH = 2
KFAC_ACTIVATION_LOGISTIC = 3
KFAC_ACTIVATION_CUSTOM = 4
KFAC_KFRA_GGN = 0
KFAC_KFRA_HESSIAN = 1

# ---------------------------------------------------------------------------------------------
# Experimental: conjugate gradient and Newton-CG (enum kfac_cg_preconditioner, kfac_cg_stop_rule,
# kfac_cg_request, kfac_cg_reason)
# ---------------------------------------------------------------------------------------------

KFAC_CG_PRECONDITIONER_NONE = 0
KFAC_CG_PRECONDITIONER_KFAC = 1
KFAC_CG_PRECONDITIONER_DIAGONAL = 2

KFAC_CG_STOP_RESIDUAL = 0
KFAC_CG_STOP_RELATIVE_PROGRESS = 1

KFAC_CG_NEED_PRODUCT = 1
KFAC_CG_DONE = 2

KFAC_CG_REASON_RUNNING = 0
KFAC_CG_REASON_RESIDUAL = 1
KFAC_CG_REASON_RELATIVE_PROGRESS = 2
KFAC_CG_REASON_MAX_ITERATIONS = 3
KFAC_CG_REASON_NON_POSITIVE_CURVATURE = 4
KFAC_CG_REASON_CALLER = 5

# ---------------------------------------------------------------------------------------------
# enum kfac_ekfac_mode (experimental: the header's "EKFAC" section)
# ---------------------------------------------------------------------------------------------

KFAC_EKFAC_PER_EXAMPLE = 0
KFAC_EKFAC_PER_ROW = 1

# ---------------------------------------------------------------------------------------------
# enum kfac_distributed_reduce, enum kfac_distributed_exchange (experimental: distributed runs)
# ---------------------------------------------------------------------------------------------

KFAC_DISTRIBUTED_REDUCE_EAGER = 0
KFAC_DISTRIBUTED_REDUCE_LAZY = 1
KFAC_DISTRIBUTED_STATISTICS = 0
KFAC_DISTRIBUTED_INVERSES = 1
KFAC_DISTRIBUTED_SCALINGS = 2

# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------


class kfac_optimizer(Structure):
    """The opaque ``struct kfac_optimizer``; only pointers to it are used."""

    _fields_ = []


#: ``kfac_optimizer *``
kfac_optimizer_p = POINTER(kfac_optimizer)


class _Growable(Structure):
    """A struct whose first field is ``struct_size``: :meth:`new` zeroes it, sets
    ``struct_size`` to its own size and sets the given fields."""

    @classmethod
    def new(cls, **fields):
        value = cls()
        value.struct_size = ctypes.sizeof(cls)
        for name, field in fields.items():
            setattr(value, name, field)
        return value


class kfac_param_info(_Growable):
    """``struct kfac_param_info``: what :func:`kfac_param_get_info` reports of a parameter."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("name", c_char_p),
        ("type", c_int32),
        ("family", c_int32),
        ("lower", c_double),
        ("upper", c_double),
        ("lower_inclusive", c_int32),
        ("upper_inclusive", c_int32),
        ("default_value", c_double),
        ("effect", c_int32),
        ("reserved", c_int32),
    ]


class kfac_dense_desc(_Growable):
    """``struct kfac_dense_desc``: a dense layer for :func:`kfac_layer_add_dense`."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("in_features", c_int64),
        ("out_features", c_int64),
        ("has_bias", c_int32),
        ("reserved", c_int32),
        ("input_group_size", c_int64),
        ("output_group_size", c_int64),
    ]


class kfac_conv2d_desc(_Growable):
    """``struct kfac_conv2d_desc``: a 2-D (or, as 1×L, 1-D) convolution for
    :func:`kfac_layer_add_conv2d`. Zero-initialised by ctypes; :meth:`new` also sets ``struct_size``
    to ``ctypes.sizeof(kfac_conv2d_desc)``. A stride, dilation or groups of 0 is read as 1."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("in_channels", c_int64),
        ("out_channels", c_int64),
        ("kernel_h", c_int64),
        ("kernel_w", c_int64),
        ("stride_h", c_int64),
        ("stride_w", c_int64),
        ("padding_h", c_int64),
        ("padding_w", c_int64),
        ("dilation_h", c_int64),
        ("dilation_w", c_int64),
        ("groups", c_int64),
        ("input_h", c_int64),
        ("input_w", c_int64),
        ("has_bias", c_int32),
        ("layout", c_int32),
        ("approximation", c_int32),
        ("reserved", c_int32),
        ("input_group_size", c_int64),
        ("output_group_size", c_int64),
    ]


class kfac_layer_info(_Growable):
    """``struct kfac_layer_info``. Set ``struct_size`` to ``ctypes.sizeof(kfac_layer_info)``
    before passing it to :func:`kfac_layer_get_info` (:meth:`new` does it)."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int32),
        ("has_bias", c_int32),
        ("in_features", c_int64),
        ("out_features", c_int64),
        ("a_dim", c_int64),
        ("g_dim", c_int64),
        ("has_factors", c_int32),
        ("has_inverses", c_int32),
        ("groups", c_int64),
    ]


c_float_p = POINTER(c_float)
c_double_p = POINTER(c_double)


class kfac_cg_desc(_Growable):
    """``struct kfac_cg_desc`` (experimental): the options of a conjugate-gradient solve."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("max_iterations", c_int32),
        ("stop_rule", c_int32),
        ("tolerance", c_double),
        ("preconditioner", c_int32),
        ("warm_start", c_int32),
        ("warm_start_decay", c_double),
        ("diagonal_exponent", c_double),
        ("l2", c_double),
    ]


class kfac_cg_result(_Growable):
    """``struct kfac_cg_result`` (experimental): the outcome of a conjugate-gradient solve."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("iterations", c_int32),
        ("products", c_int32),
        ("reason", c_int32),
        ("reserved", c_int32),
        ("grad_dot_step", c_double),
        ("step_curvature", c_double),
        ("damping_term", c_double),
        ("model_value", c_double),
        ("quadratic_value", c_double),
        ("residual_norm", c_double),
        ("gradient_norm", c_double),
        ("damping", c_double),
    ]


#: ``kfac_cg_product_fn_f32`` / ``_f64`` (experimental; for C users: the Python front-ends use
#: the reverse-communication calls, since an exception cannot cross a ctypes callback).
kfac_cg_product_fn_f32 = ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(c_float_p), POINTER(c_float_p),
                                          POINTER(c_float_p), POINTER(c_float_p), c_int32)
kfac_cg_product_fn_f64 = ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(c_double_p), POINTER(c_double_p),
                                          POINTER(c_double_p), POINTER(c_double_p), c_int32)

#: ``allreduce_sum_f32`` / ``_f64`` of ``struct kfac_collectives`` (experimental).
kfac_allreduce_sum_fn_f32 = ctypes.CFUNCTYPE(c_int, c_float_p, c_int64, c_void_p)
kfac_allreduce_sum_fn_f64 = ctypes.CFUNCTYPE(c_int, c_double_p, c_int64, c_void_p)
#: ``allgatherv_f32`` / ``_f64`` of ``struct kfac_collectives`` (experimental).
kfac_allgatherv_fn_f32 = ctypes.CFUNCTYPE(c_int, c_float_p, c_float_p, POINTER(c_int64), POINTER(c_int64), c_void_p)
kfac_allgatherv_fn_f64 = ctypes.CFUNCTYPE(c_int, c_double_p, c_double_p, POINTER(c_int64), POINTER(c_int64), c_void_p)


class kfac_collectives(_Growable):
    """``struct kfac_collectives`` (experimental): a caller's SUM-allreduce for
    :func:`kfac_distributed_synchronize`."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("user", c_void_p),
        ("allreduce_sum_f32", kfac_allreduce_sum_fn_f32),
        ("allreduce_sum_f64", kfac_allreduce_sum_fn_f64),
        ("allgatherv_f32", kfac_allgatherv_fn_f32),
        ("allgatherv_f64", kfac_allgatherv_fn_f64),
    ]


# ---------------------------------------------------------------------------------------------
# Locating and loading the shared library
# ---------------------------------------------------------------------------------------------

_LIBRARY_NAME = "libkfac.so"
#: The shared object's SONAME: libkfac.so.0.MINOR while the major version is 0, else .MAJOR.
_SONAME = (f"libkfac.so.0.{KFAC_VERSION_MINOR}" if KFAC_VERSION_MAJOR == 0
           else f"libkfac.so.{KFAC_VERSION_MAJOR}")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _candidate_paths():
    """Yields ``(description, path_or_name)`` in discovery order (see the module docstring).
    Paths may not exist; bare names are left to the dynamic loader's search."""
    env = os.environ.get("KFAC_LIBRARY")
    if env:
        yield "KFAC_LIBRARY", env
        return
    for directory in (_PACKAGE_DIR, os.path.dirname(_PACKAGE_DIR)):
        yield "next to the package", os.path.join(directory, _LIBRARY_NAME)
    directory = _PACKAGE_DIR
    while True:
        if os.path.isfile(os.path.join(directory, "Package.swift")):
            yield "source checkout", os.path.join(directory, ".build", "release", _LIBRARY_NAME)
            break
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    found = ctypes.util.find_library("kfac")
    if found:
        yield "find_library", found
    yield "dynamic loader", _SONAME


#: The system libraries libkfac.so needs at run time (the Swift runtime is linked into it), and
#: what provides them, for the import-time message when the dynamic loader cannot find one.
SYSTEM_LIBRARIES = {
    "libopenblas.so.0": "OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0; Fedora: dnf install openblas)",
    "liblapacke.so.3": "LAPACKE (Debian/Ubuntu: apt-get install liblapacke; Fedora: dnf install lapack)",
    "libstdc++.so.6": "the GNU C++ runtime libstdc++ (Debian/Ubuntu: apt-get install libstdc++6)",
    "libgcc_s.so.1": "the GCC runtime libgcc_s (Debian/Ubuntu: apt-get install libgcc-s1)",
}


def _missing_dependency(error):
    """A sentence naming the system library the loader could not find (or the too old glibc)
    in an OSError of ctypes.CDLL, or None."""
    text = str(error)
    found = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if found and found.group(1) != _LIBRARY_NAME:
        name = found.group(1)
        provider = SYSTEM_LIBRARIES.get(name, "it")
        return f"the system library {name} is missing: install {provider}."
    found = re.search(r"version `(GLIBC[\w.]*)' not found", text)
    if found:
        return f"the C library (glibc) is older than this libkfac.so needs ({found.group(1)})."
    return None


def _load_library():
    """Loads the first candidate that the dynamic loader accepts; ``ImportError`` otherwise."""
    failures = []
    missing = []
    for origin, path in _candidate_paths():
        if os.sep in path and not os.path.exists(path) and origin != "KFAC_LIBRARY":
            failures.append(f"  {origin}: {path}: not found")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as error:
            failures.append(f"  {origin}: {path}: {error}")
            reason = _missing_dependency(error)
            if reason and reason not in missing:
                missing.append(reason)
            if origin == "KFAC_LIBRARY":
                break
    if missing:
        raise ImportError(
            "libkfac: cannot load the libkfac shared library: " + " ".join(missing)
            + " libkfac.so needs OpenBLAS, LAPACKE, libstdc++ and glibc from the system. Tried:\n"
            + "\n".join(failures)
        )
    raise ImportError(
        "libkfac: cannot load the libkfac shared library. Tried:\n"
        + "\n".join(failures)
        + "\nInstall the package with `pip install <checkout>/bindings/python` (which builds and "
        "bundles it), build it with `make lib` in the libkfac checkout, or set KFAC_LIBRARY to the "
        "full path of libkfac.so."
    )


lib, library_path = _load_library()

# ---------------------------------------------------------------------------------------------
# Function prototypes, in the order of kfac.h
# ---------------------------------------------------------------------------------------------


#: Experimental functions the header declares but the loaded library does not export (an
#: experimental call may come later than its declaration, or go); they are None here, and
#: :mod:`libkfac._handle` raises ``KFAC_ERROR_UNSUPPORTED`` when one is called.
MISSING_EXPERIMENTAL = set()


def _bind(name, restype, argtypes):
    try:
        function = getattr(lib, name)
    except AttributeError:
        if name in EXPERIMENTAL_FUNCTION_NAMES:
            MISSING_EXPERIMENTAL.add(name)
            globals()[name] = None
            return None
        raise ImportError(
            f"libkfac: {library_path} does not export {name}(); it is not a libkfac built from a "
            f"kfac.h compatible with version {KFAC_VERSION_MAJOR}.{KFAC_VERSION_MINOR}."
        ) from None
    function.restype = restype
    function.argtypes = argtypes
    globals()[name] = function
    return function


_P = kfac_optimizer_p

_PROTOTYPES = [
    # Version
    ("kfac_version_number", c_uint, []),
    ("kfac_version_string", c_char_p, []),
    # Status codes
    ("kfac_status_string", c_char_p, [c_int]),
    # Handles
    ("kfac_optimizer_create", c_int, [c_int32, POINTER(kfac_optimizer_p)]),
    ("kfac_optimizer_free", None, [_P]),
    ("kfac_optimizer_last_error", c_char_p, [_P]),
    ("kfac_optimizer_get_dtype", c_int, [_P, POINTER(c_int32)]),
    # Parameters
    ("kfac_param_get_info", c_int, [c_int32, POINTER(kfac_param_info)]),
    ("kfac_param_list", c_int, [POINTER(c_int32), c_int32, POINTER(c_int32)]),
    ("kfac_param_set_double", c_int, [_P, c_int32, c_double]),
    ("kfac_param_get_double", c_int, [_P, c_int32, c_double_p]),
    ("kfac_param_set_int", c_int, [_P, c_int32, c_int64]),
    ("kfac_param_get_int", c_int, [_P, c_int32, POINTER(c_int64)]),
    # Layers
    ("kfac_layer_add_dense", c_int, [_P, POINTER(kfac_dense_desc), POINTER(c_int32)]),
    ("kfac_layer_add_conv2d", c_int, [_P, POINTER(kfac_conv2d_desc), POINTER(c_int32)]),
    ("kfac_layer_count", c_int, [_P, POINTER(c_int32)]),
    ("kfac_layer_get_info", c_int, [_P, c_int32, POINTER(kfac_layer_info)]),
    # Statistics
    ("kfac_optimizer_wants_statistics", c_int, [_P, POINTER(c_int32)]),
    ("kfac_layer_record_inputs_f32", c_int, [_P, c_int32, c_float_p, c_int64]),
    ("kfac_layer_record_inputs_f64", c_int, [_P, c_int32, c_double_p, c_int64]),
    ("kfac_layer_record_output_grads_f32", c_int, [_P, c_int32, c_float_p, c_int64]),
    ("kfac_layer_record_output_grads_f64", c_int, [_P, c_int32, c_double_p, c_int64]),
    ("kfac_optimizer_update_factors", c_int, [_P]),
    ("kfac_optimizer_discard_statistics", c_int, [_P]),
    ("kfac_optimizer_update_inverses", c_int, [_P]),
    ("kfac_layer_get_factors_f32", c_int, [_P, c_int32, c_int32, c_float_p, c_float_p]),
    ("kfac_layer_get_factors_f64", c_int, [_P, c_int32, c_int32, c_double_p, c_double_p]),
    # Preconditioning
    ("kfac_optimizer_step_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_optimizer_step_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_layer_precondition_f32", c_int, [_P, c_int32, c_float_p, c_float_p]),
    ("kfac_layer_precondition_f64", c_int, [_P, c_int32, c_double_p, c_double_p]),
    ("kfac_optimizer_get_step_count", c_int, [_P, POINTER(c_int64)]),
    ("kfac_optimizer_get_kl_scale", c_int, [_P, c_double_p]),
    # Adaptive mode
    ("kfac_adaptive_solve_step_size_f32", c_int,
     [_P, c_float_p, c_float_p, c_float_p, c_int64, c_int64, c_int32, c_double_p, c_double_p, c_double_p]),
    ("kfac_adaptive_solve_step_size_f64", c_int,
     [_P, c_double_p, c_double_p, c_double_p, c_int64, c_int64, c_int32, c_double_p, c_double_p, c_double_p]),
    ("kfac_adaptive_get_update_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_adaptive_get_update_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_adaptive_report_loss_change", c_int, [_P, c_double, c_double, c_double_p]),
    ("kfac_adaptive_get_reduction_ratio", c_int, [_P, c_double_p]),
    # Target samplers
    ("kfac_sample_targets_f32", c_int, [c_float_p, c_int64, c_int64, c_int32, c_uint64, c_float_p]),
    ("kfac_sample_targets_f64", c_int, [c_double_p, c_int64, c_int64, c_int32, c_uint64, c_double_p]),
    ("kfac_sample_output_grads_f32", c_int, [c_float_p, c_int64, c_int64, c_int32, c_uint64, c_float_p]),
    ("kfac_sample_output_grads_f64", c_int, [c_double_p, c_int64, c_int64, c_int32, c_uint64, c_double_p]),
    # State
    ("kfac_state_get_size", c_int, [_P, POINTER(c_size_t)]),
    ("kfac_state_save", c_int, [_P, c_void_p, c_size_t, POINTER(c_size_t)]),
    ("kfac_state_load", c_int, [_P, c_void_p, c_size_t]),
    ("kfac_state_save_file", c_int, [_P, c_char_p]),
    ("kfac_state_load_file", c_int, [_P, c_char_p]),
    # Experimental (KFAC_EXPERIMENTAL_API): loss reports on λ's steps only
    ("kfac_adaptive_get_report_needed", c_int, [_P, POINTER(c_int32)]),
    ("kfac_adaptive_skip_loss_report", c_int, [_P]),
    # Experimental (KFAC_EXPERIMENTAL_API): γ candidates
    ("kfac_candidates_get_count", c_int, [_P, POINTER(c_int32)]),
    ("kfac_candidates_get_directions_f32", c_int,
     [_P, c_int32, POINTER(c_float_p), POINTER(c_float_p), c_int32, c_double_p]),
    ("kfac_candidates_get_directions_f64", c_int,
     [_P, c_int32, POINTER(c_double_p), POINTER(c_double_p), c_int32, c_double_p]),
    ("kfac_candidates_solve_step_size_f32", c_int,
     [_P, c_float_p, POINTER(c_float_p), c_int32, c_float_p, c_int64, c_int64, c_int32,
      POINTER(c_int32), c_double_p, c_double_p, c_double_p]),
    ("kfac_candidates_solve_step_size_f64", c_int,
     [_P, c_double_p, POINTER(c_double_p), c_int32, c_double_p, c_int64, c_int64, c_int32,
      POINTER(c_int32), c_double_p, c_double_p, c_double_p]),
    # Experimental: products with the damped curvature
    ("kfac_curvature_multiply_f32", c_int, [_P, c_int32, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_curvature_multiply_f64", c_int, [_P, c_int32, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    # Experimental: Gauss-Newton products
    ("kfac_gn_output_hessian_multiply_f32", c_int, [c_float_p, c_float_p, c_int64, c_int64, c_int32, c_float_p]),
    ("kfac_gn_output_hessian_multiply_f64", c_int, [c_double_p, c_double_p, c_int64, c_int64, c_int32, c_double_p]),
    ("kfac_gn_output_hessian_sqrt_f32", c_int, [c_float_p, c_int64, c_int64, c_int32, c_float_p]),
    ("kfac_gn_output_hessian_sqrt_f64", c_int, [c_double_p, c_int64, c_int64, c_int32, c_double_p]),
    ("kfac_layer_record_output_grad_columns_f32", c_int, [_P, c_int32, c_float_p, c_float_p, c_int64, c_int32, c_int32]),
    ("kfac_layer_record_output_grad_columns_f64", c_int, [_P, c_int32, c_double_p, c_double_p, c_int64, c_int32, c_int32]),
    ("kfac_gn_columns_multiply_f32", c_int,
     [_P, POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_gn_columns_multiply_f64", c_int,
     [_P, POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_gn_columns_get_info", c_int, [_P, POINTER(c_int64), POINTER(c_int32), POINTER(c_int64)]),
    ("kfac_gn_columns_clear", c_int, [_P]),
    ("kfac_gn_chain_define", c_int, [_P, POINTER(c_int32), POINTER(c_int32), c_int32, c_int32]),
    ("kfac_gn_chain_forward_f32", c_int,
     [_P, POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), c_int64, c_float_p]),
    ("kfac_gn_chain_forward_f64", c_int,
     [_P, POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), c_int64, c_double_p]),
    ("kfac_gn_chain_record_columns", c_int, [_P, c_int32]),
    ("kfac_gn_chain_record_kfra_f32", c_int, [_P, c_int32, c_int32, c_float_p]),
    ("kfac_gn_chain_record_kfra_f64", c_int, [_P, c_int32, c_int32, c_double_p]),
    ("kfac_gn_chain_multiply_f32", c_int,
     [_P, POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_gn_chain_multiply_f64", c_int,
     [_P, POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    # Experimental: conjugate gradient and Newton-CG
    ("kfac_cg_begin_f32", c_int, [_P, POINTER(kfac_cg_desc), POINTER(c_float_p), POINTER(c_float_p),
                                  POINTER(c_float_p), POINTER(c_float_p), c_int32, POINTER(c_int32)]),
    ("kfac_cg_begin_f64", c_int, [_P, POINTER(kfac_cg_desc), POINTER(c_double_p), POINTER(c_double_p),
                                  POINTER(c_double_p), POINTER(c_double_p), c_int32, POINTER(c_int32)]),
    ("kfac_cg_get_vector_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_cg_get_vector_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_cg_supply_product_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32, POINTER(c_int32)]),
    ("kfac_cg_supply_product_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32, POINTER(c_int32)]),
    ("kfac_cg_finish_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32, POINTER(kfac_cg_result)]),
    ("kfac_cg_finish_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32, POINTER(kfac_cg_result)]),
    ("kfac_cg_report_loss_change", c_int, [_P, c_double, c_double, c_double, c_double_p]),
    ("kfac_cg_solve_f32", c_int, [_P, POINTER(kfac_cg_desc), POINTER(c_float_p), POINTER(c_float_p),
                                  POINTER(c_float_p), POINTER(c_float_p), kfac_cg_product_fn_f32, c_void_p,
                                  POINTER(c_float_p), POINTER(c_float_p), c_int32, POINTER(kfac_cg_result)]),
    ("kfac_cg_solve_f64", c_int, [_P, POINTER(kfac_cg_desc), POINTER(c_double_p), POINTER(c_double_p),
                                  POINTER(c_double_p), POINTER(c_double_p), kfac_cg_product_fn_f64, c_void_p,
                                  POINTER(c_double_p), POINTER(c_double_p), c_int32, POINTER(kfac_cg_result)]),
    # Experimental: EKFAC
    ("kfac_layer_record_examples_f32", c_int, [_P, c_int32, c_float_p, c_float_p, c_int64, c_int64]),
    ("kfac_layer_record_examples_f64", c_int, [_P, c_int32, c_double_p, c_double_p, c_int64, c_int64]),
    ("kfac_layer_get_ekfac_scaling_f32", c_int, [_P, c_int32, c_int32, c_float_p]),
    ("kfac_layer_get_ekfac_scaling_f64", c_int, [_P, c_int32, c_int32, c_double_p]),
    # Experimental (KFAC_EXPERIMENTAL_API): distributed runs
    ("kfac_distributed_set_world", c_int, [_P, c_int32, c_int32]),
    ("kfac_distributed_get_world", c_int, [_P, POINTER(c_int32), POINTER(c_int32)]),
    ("kfac_distributed_get_count", c_int, [_P, c_int32, POINTER(c_int64)]),
    ("kfac_distributed_get_due", c_int, [_P, c_int32, POINTER(c_int32)]),
    ("kfac_distributed_get_owner", c_int, [_P, c_int32, c_int32, c_int32, c_int32, POINTER(c_int32)]),
    ("kfac_distributed_pack_statistics_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_pack_statistics_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_unpack_statistics_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_unpack_statistics_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_pack_inverses_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_pack_inverses_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_unpack_inverses_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_unpack_inverses_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_pack_scalings_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_pack_scalings_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_unpack_scalings_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_unpack_scalings_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_pack_model_sums_f32", c_int,
     [_P, c_float_p, POINTER(c_float_p), c_int32, c_float_p, c_int64, c_int64, c_int32, c_double_p, c_int64]),
    ("kfac_distributed_pack_model_sums_f64", c_int,
     [_P, c_double_p, POINTER(c_double_p), c_int32, c_double_p, c_int64, c_int64, c_int32, c_double_p, c_int64]),
    ("kfac_distributed_solve_model_sums", c_int,
     [_P, c_double_p, c_int64, POINTER(c_int32), c_double_p, c_double_p, c_double_p]),
    ("kfac_distributed_get_inverse_layout", c_int, [_P, POINTER(c_int64), POINTER(c_int64), c_int32]),
    ("kfac_distributed_pack_owned_inverses_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_pack_owned_inverses_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_unpack_gathered_inverses_f32", c_int, [_P, c_float_p, c_int64]),
    ("kfac_distributed_unpack_gathered_inverses_f64", c_int, [_P, c_double_p, c_int64]),
    ("kfac_distributed_synchronize", c_int, [_P, POINTER(kfac_collectives)]),
    # Experimental: block-tridiagonal links
    ("kfac_layer_link", c_int, [_P, c_int32, c_int32]),
    ("kfac_layer_get_cross_factors_f32", c_int, [_P, c_int32, c_float_p, c_float_p]),
    ("kfac_layer_get_cross_factors_f64", c_int, [_P, c_int32, c_double_p, c_double_p]),
]

#: The functions of the header's experimental section (``KFAC_EXPERIMENTAL_API``).
EXPERIMENTAL_FUNCTION_NAMES = tuple(name for name, _, _ in _PROTOTYPES
                                    if name.startswith(("kfac_adaptive_get_report_needed", "kfac_adaptive_skip_loss_report",
                                                        "kfac_candidates_", "kfac_curvature_", "kfac_gn_",
                                                        "kfac_layer_record_output_grad_columns_",
                                                        "kfac_layer_record_examples_",
                                                        "kfac_layer_get_ekfac_scaling_", "kfac_cg_", "kfac_distributed_",
                                                        "kfac_layer_link", "kfac_layer_get_cross_factors_")))

#: Names of all bound functions, in header order.
FUNCTION_NAMES = tuple(name for name, _, _ in _PROTOTYPES)

# ---------------------------------------------------------------------------------------------
# Version check (before binding the rest: another major version may export other functions)
# ---------------------------------------------------------------------------------------------

for _name, _restype, _argtypes in _PROTOTYPES[:2]:
    _bind(_name, _restype, _argtypes)

#: The version number of the library actually loaded.
loaded_version_number = int(kfac_version_number())  # noqa: F821 (bound above)
#: The version string of the library actually loaded, e.g. ``"0.1.0"``.
loaded_version_string = kfac_version_string().decode("utf-8", "replace")  # noqa: F821

def abi_compatible(version_number: int) -> bool:
    """Whether a library of this version number has these bindings' ABI: the same major
    version, and while the major version is 0 the same minor version too (the header's
    compatibility policy)."""
    major, minor = version_number // 10000, version_number // 100 % 100
    if major != KFAC_VERSION_MAJOR:
        return False
    return major != 0 or minor == KFAC_VERSION_MINOR


if not abi_compatible(loaded_version_number):
    _series = f"{KFAC_VERSION_MAJOR}.{KFAC_VERSION_MINOR}" if KFAC_VERSION_MAJOR == 0 else f"{KFAC_VERSION_MAJOR}"
    raise ImportError(
        f"libkfac: {library_path} is libkfac {loaded_version_string} (version number "
        f"{loaded_version_number}), but these bindings were written for {KFAC_VERSION_STRING} "
        f"(version number {KFAC_VERSION_NUMBER}); the major versions (or, before 1.0, the minor "
        f"versions) differ, and with them the ABI. Install matching bindings or point "
        f"KFAC_LIBRARY at a libkfac {_series}.x."
    )

for _name, _restype, _argtypes in _PROTOTYPES[2:]:
    _bind(_name, _restype, _argtypes)
del _name, _restype, _argtypes


def status_name(status: int) -> str:
    """The constant name of a status code, e.g. ``"KFAC_ERROR_NO_STATISTICS"``, or
    ``"KFAC_STATUS_<n>"`` for a code these bindings do not know."""
    return STATUS_NAMES.get(status, f"KFAC_STATUS_{status}")


def status_string(status: int) -> str:
    """The library's English description of a status code (:func:`kfac_status_string`)."""
    return kfac_status_string(status).decode("utf-8", "replace")  # noqa: F821
