"""Python bindings of libkfac, the K-FAC curvature step for neural-network training.

The library keeps Kronecker-factored curvature statistics of your layers and turns parameter
gradients into preconditioned update directions; you run the forward and backward passes and
apply the directions with your own learning rate. See ``include/kfac.h`` for the mathematics.

Quick start with numpy::

    import numpy as np, kfac

    with kfac.Optimizer(np.float32, damping=1e-2) as opt:
        layer = opt.add_dense(784, 10)
        for x, dlogits, dw, db in batches:         # dlogits: gradient of a summed loss
            if opt.wants_statistics:
                opt.record_inputs(layer, x)
                opt.record_output_grads(layer, dlogits)
            opt.step([dw], [db])                   # dw, db now hold the directions
            w -= lr * dw; b -= lr * db

Convolutions: :meth:`Optimizer.add_conv2d` / :meth:`Optimizer.add_conv1d` (PyTorch's
conventions plus the fixed input size); channel grouping through the ``input_group_size`` and
``output_group_size`` arguments of the ``add_*`` methods.

With PyTorch, use :class:`kfac.torch.KFACPreconditioner` (``nn.Linear``, ``nn.Conv2d``,
``nn.Conv1d``).

Modules:
    :mod:`kfac._lib`: the raw ctypes mirror of ``kfac.h`` (all functions and constants);
    :mod:`kfac.torch`: the PyTorch integration (imported on demand, needs torch).
"""

from . import _lib
from ._lib import (
    library_path,
    loaded_version_number,
    loaded_version_string,
    status_name,
    status_string,
)
from ._optimizer import PARAMETERS, KFACError, LayerInfo, Optimizer

__version__ = "0.1.0"

# Every KFAC_* constant of kfac.h (status codes, parameters, dtypes, strategies, reductions,
# layer kinds, layouts, conv approximations, version macros) is also available as kfac.KFAC_*.
_CONSTANTS = {name: getattr(_lib, name) for name in dir(_lib) if name.startswith("KFAC_")}
globals().update(_CONSTANTS)

#: Version of the loaded shared library, e.g. ``"0.1.0"``.
library_version = loaded_version_string

__all__ = [
    "KFACError",
    "LayerInfo",
    "Optimizer",
    "PARAMETERS",
    "library_path",
    "library_version",
    "loaded_version_number",
    "status_name",
    "status_string",
] + sorted(_CONSTANTS)
