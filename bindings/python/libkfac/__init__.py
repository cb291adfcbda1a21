"""Python bindings of libkfac, the K-FAC curvature step for neural-network training.

The library keeps Kronecker-factored curvature statistics of your layers and turns parameter
gradients into preconditioned update directions; you run the forward and backward passes and
apply the directions with your own learning rate. See ``include/kfac.h`` for the mathematics.

Quick start with numpy::

    import numpy as np, libkfac

    with libkfac.Optimizer(np.float32, damping=1e-2) as opt:
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

Adaptive mode (Martens & Grosse 2015, §6–7): after :meth:`Optimizer.step`, give
:meth:`Optimizer.solve_step_size` the outputs and the forward-mode products ``J·D``, ``J·δ₀``;
apply ``θ ← θ − α·D + μ·δ₀`` and report the losses with :meth:`Optimizer.report_loss_change`
(Levenberg–Marquardt damping with ``lm_interval``, ``lm_decay``). With ``factor_damping_period``
the factor damping γ is re-chosen every T₂ steps (§6.6): fetch each candidate's directions with
:meth:`Optimizer.candidate_directions`, solve with :meth:`Optimizer.solve_step_size_candidates`
and apply :meth:`Optimizer.get_update`. :func:`sampled_output_grads`
(and :func:`sample_targets`) give the output gradients whose statistics estimate the true Fisher.

With PyTorch, use :class:`libkfac.torch.KFACPreconditioner` (``nn.Linear``, ``nn.Conv2d``,
``nn.Conv1d``), whose ``sampled_fisher_backward`` and ``adaptive_step`` do the above for a
model.

Modules:
    :mod:`libkfac.optimizer`: the numpy :class:`Optimizer`;
    :mod:`libkfac.adaptive`: its adaptive-mode methods;
    :mod:`libkfac.sampling`: the target samplers;
    :mod:`libkfac.gauss_newton`: experimental exact Gauss-Newton products (stored Jacobian
    columns, KFLR's output factor, the dense chain's R operator);
    :mod:`libkfac.newton_cg`: conjugate gradient and Newton-CG (experimental ``kfac_cg_*``);
    :mod:`libkfac.torch`: the PyTorch integration (imported on demand, needs torch);
    :mod:`libkfac._lib`: the raw ctypes mirror of ``kfac.h`` (all functions and constants);
    :mod:`libkfac._handle`: the address-level calls both front-ends use.

The import name is ``libkfac`` (it was ``kfac`` in 0.1, the import name of kfac-pytorch and of
the PyPI distribution ``kfac``).
"""

from . import _lib
from ._lib import (
    library_path,
    loaded_version_number,
    loaded_version_string,
    status_name,
    status_string,
)
from ._errors import KFACError
from ._params import PARAMETERS, Parameter
from .optimizer import LayerInfo, Optimizer
from .sampling import DISTRIBUTIONS, sample_targets, sampled_output_grads

#: The version of kfac.h these bindings mirror (the distribution's version too).
__version__ = _lib.KFAC_VERSION_STRING

# Every KFAC_* constant of kfac.h (status codes, parameters, dtypes, strategies, reductions,
# layer kinds, layouts, conv approximations, distributions, version macros) is also available as
# libkfac.KFAC_*.
_CONSTANTS = {name: getattr(_lib, name) for name in dir(_lib) if name.startswith("KFAC_")}
globals().update(_CONSTANTS)

#: Version of the loaded shared library, e.g. ``"0.2.0"``.
library_version = loaded_version_string

__all__ = [
    "DISTRIBUTIONS",
    "KFACError",
    "LayerInfo",
    "Optimizer",
    "PARAMETERS",
    "Parameter",
    "library_path",
    "library_version",
    "loaded_version_number",
    "sample_targets",
    "sampled_output_grads",
    "status_name",
    "status_string",
] + sorted(_CONSTANTS)
