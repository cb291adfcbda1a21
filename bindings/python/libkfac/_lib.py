"""Low-level ctypes bindings of libkfac, mirroring ``include/kfac.h`` one to one.

Every function declared in the header is available here under the same name with its
``argtypes`` and ``restype`` set; every enum value and version macro is a module constant with
the same name; the structs ``kfac_layer_info`` and ``kfac_conv2d_desc`` are
:class:`ctypes.Structure` subclasses. Nothing here checks statuses or converts arrays: that
is the job of :mod:`kfac` (see :class:`kfac.Optimizer`).

The shared library is located, in this order:

1. the environment variable ``KFAC_LIBRARY`` (a full path; if it is set, nothing else is tried);
2. ``libkfac.so`` next to the package (inside the ``kfac`` directory, then beside it);
3. ``<repo>/.build/release/libkfac.so`` where ``<repo>`` is the first directory above the
   package that contains ``Package.swift`` (a source checkout built with
   ``swift build -c release --product kfac``);
4. ``ctypes.util.find_library("kfac")``, then ``libkfac.so.0`` through the dynamic loader's
   ordinary search (``LD_LIBRARY_PATH``, ``ldconfig``).

At import the loaded library's ``kfac_version_number()`` is compared with
:data:`KFAC_VERSION_NUMBER`, the version these bindings were written for; a different major
version raises :class:`ImportError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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
KFAC_VERSION_MINOR = 1
KFAC_VERSION_PATCH = 0
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
# enum kfac_param
# ---------------------------------------------------------------------------------------------

KFAC_PARAM_LEARNING_RATE = 1
KFAC_PARAM_DAMPING = 2
KFAC_PARAM_FACTOR_DECAY = 3
KFAC_PARAM_KL_CLIP = 4
KFAC_PARAM_OUTPUT_GRAD_SCALE = 5
KFAC_PARAM_LM_DECAY = 6
KFAC_PARAM_FACTOR_DAMPING = 7
KFAC_PARAM_FACTOR_DAMPING_DECAY = 8
KFAC_PARAM_FACTOR_UPDATE_PERIOD = 100
KFAC_PARAM_INVERSE_UPDATE_PERIOD = 101
KFAC_PARAM_INVERSE_STRATEGY = 102
KFAC_PARAM_PI_DAMPING = 103
KFAC_PARAM_LOSS_REDUCTION = 104
KFAC_PARAM_NUM_THREADS = 105
KFAC_PARAM_LM_INTERVAL = 106
KFAC_PARAM_FACTOR_DAMPING_PERIOD = 107

# ---------------------------------------------------------------------------------------------
# enum kfac_inverse_strategy, enum kfac_reduction, enum kfac_layer_kind, enum kfac_layout,
# enum kfac_conv_approximation
# ---------------------------------------------------------------------------------------------

KFAC_INVERSE_CHOLESKY = 0
KFAC_INVERSE_EIGEN = 1

KFAC_REDUCTION_SUM = 0
KFAC_REDUCTION_MEAN = 1

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
# Types
# ---------------------------------------------------------------------------------------------


class kfac_optimizer(Structure):
    """The opaque ``struct kfac_optimizer``; only pointers to it are used."""

    _fields_ = []


#: ``kfac_optimizer *``
kfac_optimizer_p = POINTER(kfac_optimizer)


class kfac_layer_info(Structure):
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

    @classmethod
    def new(cls) -> "kfac_layer_info":
        """A zeroed struct with ``struct_size`` set to its own size."""
        info = cls()
        info.struct_size = ctypes.sizeof(cls)
        return info


class kfac_conv2d_desc(Structure):
    """``struct kfac_conv2d_desc``: a 2-D (or, as 1×L, 1-D) convolution for
    :func:`kfac_add_conv2d`. Zero-initialised by ctypes; :meth:`new` also sets ``struct_size``
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

    @classmethod
    def new(cls, **fields) -> "kfac_conv2d_desc":
        """A zeroed struct with ``struct_size`` set to its own size and the given fields set."""
        desc = cls()
        desc.struct_size = ctypes.sizeof(cls)
        for name, value in fields.items():
            setattr(desc, name, value)
        return desc


c_float_p = POINTER(c_float)
c_double_p = POINTER(c_double)

# ---------------------------------------------------------------------------------------------
# Locating and loading the shared library
# ---------------------------------------------------------------------------------------------

_LIBRARY_NAME = "libkfac.so"
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
    yield "dynamic loader", "libkfac.so.0"


def _load_library():
    """Loads the first candidate that the dynamic loader accepts; ``ImportError`` otherwise."""
    failures = []
    for origin, path in _candidate_paths():
        if os.sep in path and not os.path.exists(path) and origin != "KFAC_LIBRARY":
            failures.append(f"  {origin}: {path}: not found")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as error:
            failures.append(f"  {origin}: {path}: {error}")
            if origin == "KFAC_LIBRARY":
                break
    raise ImportError(
        "kfac: cannot load the libkfac shared library. Tried:\n"
        + "\n".join(failures)
        + "\nBuild it with `swift build -c release --product kfac` in the libkfac checkout, or set "
        "KFAC_LIBRARY to the full path of libkfac.so."
    )


lib, library_path = _load_library()

# ---------------------------------------------------------------------------------------------
# Function prototypes, in the order of kfac.h
# ---------------------------------------------------------------------------------------------


def _bind(name, restype, argtypes):
    try:
        function = getattr(lib, name)
    except AttributeError:
        raise ImportError(
            f"kfac: {library_path} does not export {name}(); it is not a libkfac built from a "
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
    ("kfac_optimizer_create", c_int, [c_int, POINTER(kfac_optimizer_p)]),
    ("kfac_optimizer_free", None, [_P]),
    ("kfac_last_error", c_char_p, [_P]),
    ("kfac_dtype_of", c_int, [_P]),
    # Parameters
    ("kfac_set_param_double", c_int, [_P, c_int, c_double]),
    ("kfac_get_param_double", c_int, [_P, c_int, c_double_p]),
    ("kfac_set_param_int", c_int, [_P, c_int, c_int64]),
    ("kfac_get_param_int", c_int, [_P, c_int, POINTER(c_int64)]),
    # Layers
    ("kfac_add_dense", c_int, [_P, c_int64, c_int64, c_int, POINTER(c_int32)]),
    ("kfac_add_dense_grouped", c_int, [_P, c_int64, c_int64, c_int, c_int64, c_int64, POINTER(c_int32)]),
    ("kfac_add_conv2d", c_int, [_P, POINTER(kfac_conv2d_desc), POINTER(c_int32)]),
    ("kfac_layer_count", c_int, [_P]),
    ("kfac_layer_get_info", c_int, [_P, c_int32, POINTER(kfac_layer_info)]),
    # Statistics
    ("kfac_wants_statistics", c_int, [_P]),
    ("kfac_record_inputs_f32", c_int, [_P, c_int32, c_float_p, c_int64]),
    ("kfac_record_inputs_f64", c_int, [_P, c_int32, c_double_p, c_int64]),
    ("kfac_record_output_grads_f32", c_int, [_P, c_int32, c_float_p, c_int64]),
    ("kfac_record_output_grads_f64", c_int, [_P, c_int32, c_double_p, c_int64]),
    ("kfac_update_factors", c_int, [_P]),
    ("kfac_update_inverses", c_int, [_P]),
    ("kfac_get_factors_f32", c_int, [_P, c_int32, c_float_p, c_float_p]),
    ("kfac_get_factors_f64", c_int, [_P, c_int32, c_double_p, c_double_p]),
    ("kfac_get_group_factors_f32", c_int, [_P, c_int32, c_int32, c_float_p, c_float_p]),
    ("kfac_get_group_factors_f64", c_int, [_P, c_int32, c_int32, c_double_p, c_double_p]),
    # Preconditioning
    ("kfac_step_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_step_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_precondition_f32", c_int, [_P, c_int32, c_float_p, c_float_p]),
    ("kfac_precondition_f64", c_int, [_P, c_int32, c_double_p, c_double_p]),
    ("kfac_step_count", c_int64, [_P]),
    ("kfac_last_kl_scale", c_double, [_P]),
    # Adaptive mode
    ("kfac_solve_step_size_f32", c_int,
     [_P, c_float_p, c_float_p, c_float_p, c_int64, c_int64, c_int, c_double_p, c_double_p, c_double_p]),
    ("kfac_solve_step_size_f64", c_int,
     [_P, c_double_p, c_double_p, c_double_p, c_int64, c_int64, c_int, c_double_p, c_double_p, c_double_p]),
    ("kfac_candidate_count", c_int, [_P, POINTER(c_int32)]),
    ("kfac_candidate_directions_f32", c_int,
     [_P, c_int32, POINTER(c_float_p), POINTER(c_float_p), c_int32, c_double_p]),
    ("kfac_candidate_directions_f64", c_int,
     [_P, c_int32, POINTER(c_double_p), POINTER(c_double_p), c_int32, c_double_p]),
    ("kfac_solve_step_size_candidates_f32", c_int,
     [_P, c_float_p, POINTER(c_float_p), c_int32, c_float_p, c_int64, c_int64, c_int,
      POINTER(c_int32), c_double_p, c_double_p, c_double_p]),
    ("kfac_solve_step_size_candidates_f64", c_int,
     [_P, c_double_p, POINTER(c_double_p), c_int32, c_double_p, c_int64, c_int64, c_int,
      POINTER(c_int32), c_double_p, c_double_p, c_double_p]),
    ("kfac_get_update_f32", c_int, [_P, POINTER(c_float_p), POINTER(c_float_p), c_int32]),
    ("kfac_get_update_f64", c_int, [_P, POINTER(c_double_p), POINTER(c_double_p), c_int32]),
    ("kfac_report_loss_change", c_int, [_P, c_double, c_double, c_double_p]),
    ("kfac_last_reduction_ratio", c_double, [_P]),
    ("kfac_sample_targets_f32", c_int, [c_float_p, c_int64, c_int64, c_int, c_uint64, c_float_p]),
    ("kfac_sample_targets_f64", c_int, [c_double_p, c_int64, c_int64, c_int, c_uint64, c_double_p]),
    ("kfac_sampled_output_grads_f32", c_int, [c_float_p, c_int64, c_int64, c_int, c_uint64, c_float_p]),
    ("kfac_sampled_output_grads_f64", c_int, [c_double_p, c_int64, c_int64, c_int, c_uint64, c_double_p]),
    # State
    ("kfac_state_size", c_int, [_P, POINTER(c_size_t)]),
    ("kfac_save_state", c_int, [_P, c_void_p, c_size_t, POINTER(c_size_t)]),
    ("kfac_load_state", c_int, [_P, c_void_p, c_size_t]),
    ("kfac_save_state_file", c_int, [_P, c_char_p]),
    ("kfac_load_state_file", c_int, [_P, c_char_p]),
]

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

if loaded_version_number // 10000 != KFAC_VERSION_MAJOR:
    raise ImportError(
        f"kfac: {library_path} is libkfac {loaded_version_string} (version number "
        f"{loaded_version_number}), but these bindings were written for "
        f"{KFAC_VERSION_MAJOR}.{KFAC_VERSION_MINOR}.{KFAC_VERSION_PATCH} (version number "
        f"{KFAC_VERSION_NUMBER}); the major versions differ. Install matching bindings or point "
        f"KFAC_LIBRARY at a libkfac {KFAC_VERSION_MAJOR}.x."
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
