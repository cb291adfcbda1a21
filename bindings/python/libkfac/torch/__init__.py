"""PyTorch integration: K-FAC preconditioning of a model's ``nn.Linear``, ``nn.Conv2d`` and
``nn.Conv1d`` layers.

Usage::

    import torch
    from libkfac.torch import KFACPreconditioner

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 28 * 28, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    preconditioner = KFACPreconditioner(model, lr=0.1, damping=1e-2)
    for x, y in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)   # mean-reduced
        loss.backward()
        preconditioner.step()      # .grad of every preconditioned layer now holds the direction
        optimizer.step()

The preconditioner handles every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` of the model
whose weight requires a gradient (in ``model.named_modules()`` order; library layer ids follow
that order), with the module's own stride, padding, dilation, groups and bias. It installs on
each a forward-pre hook, which keeps the layer's input, and a backward pre-hook, which hands the
input and the gradient at the layer's output to the library. Both record only while the model is
in training mode with gradients enabled, and only when the library wants statistics for the
current step. Tensors are passed to the library without a copy when they are contiguous CPU
tensors of the optimizer's dtype (channels-last tensors are copied to NCHW).

Registration of convolutions. The library fixes a convolution's input size (H, W) when the layer
is registered, and all layers must be registered before the first statistics are recorded. The
preconditioner therefore registers its layers (all of them, in module order) either

- at construction, when the model has no convolution or ``input_shapes`` gives the spatial size
  of every convolution's input; or
- after the first *training* forward pass (training mode, gradients enabled): the forward-pre
  hooks note each convolution's input size, and a forward hook on ``model`` registers all layers
  when that pass returns (or, if ``model`` itself is not called, the first backward hook or
  :meth:`KFACPreconditioner.step` does). Forward passes in eval mode or under ``torch.no_grad()``
  before that do not count. A convolution that did not run in that pass needs ``input_shapes``
  (or ``skip_layers``).

Afterwards every training forward pass must feed each convolution inputs of its registered
spatial size (``ValueError`` otherwise); eval-mode and no-grad passes may use any size.
:meth:`KFACPreconditioner.state_dict` stores the input sizes, so a fresh preconditioner can
:meth:`~KFACPreconditioner.load_state_dict` before its first forward pass.

Padding. ``padding`` given as ints or tuples is used as is, ``'valid'`` as 0 and ``'same'`` as
``dilation·(kernel − 1)/2`` when that is a whole number (PyTorch pads odd totals asymmetrically,
which the library's symmetric padding cannot express). Such an asymmetric ``'same'``, and any
``padding_mode`` other than ``'zeros'`` (reflect, replicate, circular: the library models zero
padding), raise ``ValueError`` at construction naming the module: a preconditioner that silently
left layers out would not be the optimizer the caller asked for. Exclude such layers explicitly
with ``skip_layers``.

Inputs of a ``Linear`` with extra leading dimensions (``[N, T, in]``) are flattened into
``N·T`` rows; a convolution records ``N`` examples (an unbatched input counts as one). The
default ``loss_reduction='mean'`` matches PyTorch's mean-reduced losses: the library multiplies
the recorded output gradients by the rows (Linear) or examples (convolutions) of each call. For a
summed loss pass ``loss_reduction='sum'``; with a loss scaler set ``output_grad_scale``.

The true Fisher and the adaptive mode. :meth:`KFACPreconditioner.sampled_fisher_backward`
records a step's statistics from targets sampled from the model (call it between the forward
pass and ``loss.backward()``); :meth:`KFACPreconditioner.adaptive_step` replaces
``optimizer.step()`` by K-FAC's adaptive update (α and μ from the quadratic model with the exact
Fisher, forward-mode products by ``torch.func.jvp``, Levenberg–Marquardt damping, and with
``factor_damping_period`` the periodic re-choice of the factor damping γ).

Newton-CG. :class:`NewtonCG` (``_newton_cg``) trains any ``nn.Module`` by subsampled Newton-CG with
Levenberg–Marquardt damping on the library's conjugate gradient (experimental ``kfac_cg_*``),
G·v by ``torch.func`` (or a ``curvature_product=`` callable), with no, diagonal or this
preconditioner's K-FAC preconditioning (the solver may be built before the first forward pass; it
binds to the layers when they are registered).

Modules: ``_registration`` (which modules, their options, padding and input sizes),
``_hooks`` (the statistics hooks), ``_sampled_fisher``, ``_adaptive`` (``adaptive_step``),
``_state`` (``state_dict``); :class:`KFACPreconditioner` combines them. Experimental:
``_columns`` (:class:`ColumnRecorder`, exact Gauss-Newton products from stored Jacobian columns,
a ``curvature_product`` callable for Newton-CG).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import _lib
from .._errors import KFACError
from .._params import PARAMETERS
from ..optimizer import Optimizer
from ._adaptive import AdaptiveMixin, AdaptiveStepResult
from ._columns import ColumnRecorder  # experimental: stored-column Gauss-Newton products
from ._curvature import CURVATURES, CurvatureMixin  # experimental: KFLR, MC, KFRA factors
from ._hooks import HooksMixin
from ._newton_cg import NewtonCG, NewtonCGStepResult
from ._registration import (
    SUPPORTED_MODULES,
    TORCH_TO_NUMPY,
    RegistrationMixin,
    configure_layers,
    discover_layers,
    layer_dtype,
)
from ._sampled_fisher import SampledFisherMixin
from ._state import StateMixin

__all__ = ["AdaptiveStepResult", "ColumnRecorder", "KFACPreconditioner", "NewtonCG", "NewtonCGStepResult",
           "SUPPORTED_MODULES"]


class KFACPreconditioner(RegistrationMixin, HooksMixin, SampledFisherMixin, CurvatureMixin, AdaptiveMixin, StateMixin):
    """K-FAC preconditioning of the ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` layers of a
    PyTorch model.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``: it rewrites
    each layer's ``weight.grad`` and ``bias.grad`` in place with the preconditioned, KL-clipped
    direction. Other parameters' gradients are left alone. See the module documentation for
    when convolutions are registered with the library.

    Every argument after ``model`` is keyword-only. A library parameter left at ``None`` keeps
    the library's default (:data:`libkfac.PARAMETERS`, read from the library); the names are the
    library's (``libkfac.Optimizer`` properties), except ``lr`` for ``learning_rate``.

    Args:
        model: the model; its ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` submodules are
            preconditioned.

    Core K-FAC parameters (library family ``core``):
        lr: the learning rate the update will be applied with (used only by the KL clip). A float,
            or a callable returning the current learning rate, evaluated at every :meth:`step`
            (e.g. ``lambda: optimizer.param_groups[0]["lr"]``).
        damping: λ (see ``kfac.h``).
        factor_decay: β of the factors' moving average.
        kl_clip: κ of the KL clip; 0 disables it.
        factor_update_period: fold statistics into the factors every this many steps.
        inverse_update_period: recompute the inverses every this many steps.
        inverse_strategy: ``'eigen'`` (exact damping), ``'cholesky'`` (factored damping) or
            ``'ekfac'`` (experimental: the eigen strategy's bases re-scaled by per-example
            gradients; the hooks then record inputs and output gradients as pairs, see
            ``ekfac_mode``).
        pi_damping: use π in factored damping (Cholesky strategy).
        loss_reduction: ``'mean'`` (the default HERE, unlike the library's ``'sum'``: PyTorch's
            losses are mean-reduced) or ``'sum'``.
        output_grad_scale: the loss scale of mixed-precision training (1 otherwise).
        num_threads: threads the library uses for inversions (0 = all CPUs).
        inverse_spread: spread the inversions of a period over its steps, block by block (each
            block re-inverted once per period at its own step; inverses at most one period old).
        async_inversion: ``True``/``'newest'``, ``'deterministic'`` or ``False``/``'off'``:
            the library's thread inverts in the background while the model runs its forward and
            backward passes; a step uses the newest finished inverses (``'deterministic'``:
            exactly those of the previous due step), at most one period staler than without it.

    Adaptive mode (library family ``adaptive``; see :meth:`adaptive_step`):
        lm_interval, lm_decay: T₁ and ω₁ of the Levenberg–Marquardt adjustment of λ;
            ``lm_interval=0`` (the library's default) keeps λ fixed.
        factor_damping: γ, the damping of the factor inverses when > 0 (0, the library's
            default: λ is used for both), so that the Levenberg–Marquardt adjustment of λ only
            changes the quadratic model of the adaptive mode (Martens & Grosse 2015, §6.6).
        factor_damping_period, factor_damping_decay: T₂ and ω₂'s base of the re-choice of γ:
            every T₂ steps :meth:`adaptive_step` tries γ, γ·ω₂ and γ/ω₂
            (ω₂ = ``factor_damping_decay ** factor_damping_period``; starting from λ when γ is 0)
            and keeps the one whose update lowers the quadratic model most.
            ``factor_damping_period=0`` (the library's default) keeps γ fixed.
        damping_min: λ_min, the floor of the Levenberg–Marquardt adjustment of λ.
        factor_damping_ratio: r, the re-choice of γ keeps γ within [λ/r, λ·r].

    EKFAC (library family ``ekfac``, used with ``inverse_strategy='ekfac'``):
        ekfac_decay: β_S of the moving average of the scaling S between eigenbasis refreshes.
        ekfac_mode: ``'per_example'`` (the library's default, and what this integration
            relies on: PyTorch hands each hook whole examples — the first dimension — so the
            exact per-example gradient of a sequence ``[N, T, in]`` or of a convolution's
            positions costs no extra bookkeeping, one small gemm per example) or ``'per_row'``
            (every token or position its own example: one gemm per step, cross terms dropped).
            For plain ``[N, in]`` batches the two are identical.

    Distributed runs (experimental; library family ``distributed``):
        process_group: a ``torch.distributed`` process group (``True``: the default group) whose
            ranks train one model data-parallel. Each rank records the statistics of its own
            local batch; :meth:`step` then SUM-allreduces the packed statistics (``all_reduce``;
            gloo on CPU shares the buffers, NCCL copies them to the device and back) and gathers
            the inverses (``all_gather`` of each rank's own blocks, padded to the largest rank's
            share), each rank inverting only the blocks it owns, so that every rank gets the same
            directions as one process on the union batch. The gradients must already be those
            of the union batch's mean loss (DDP's average is, for equal local batches); the
            library never reduces gradients. Works with ``inverse_strategy='ekfac'`` (a third
            ``all_reduce`` carries the per-example sums of EKFAC's scaling) and with
            ``tridiagonal=True`` (the cross factors travel with the statistics, each linked
            layer's inverse is computed by one rank).
        distributed_reduce: ``'eager'`` (the default: union statistics at every factor update,
            exact for any local batch sizes) or ``'lazy'`` (moving averages averaged only before
            an inverse update: less traffic, exact only for equal local batches).

    Curvature of the output-side factors (experimental; see ``_curvature``):
        curvature: ``'fisher'`` (the default: the gradients the hooks see in ``loss.backward()``,
            or :meth:`sampled_fisher_backward`'s), ``'kflr'`` (the exact expectation of the
            per-example Gauss-Newton blocks, from the K = output_dim columns of the output
            Hessian's square root, back-propagated by vmapped backward passes), ``'mc'`` (the
            Monte-Carlo Fisher with ``mc_samples`` sampled output gradients per example) or
            ``'kfra'`` (KFRA's batch-averaged recursion, for an ``nn.Sequential`` of Linear
            layers and elementwise activations, by the library's dense chain). ``'kflr'`` and
            ``'mc'`` take Linear, Conv2d and Conv1d layers (batched inputs), ``'kfra'`` Linear
            only. With any but ``'fisher'``, call :meth:`curvature_backward` between the forward
            pass and ``loss.backward()``.
        mc_samples: samples per example of ``curvature='mc'``.

    Layers (which modules, in which precision):
        dtype: precision of the library's state; ``None`` follows the layers' parameters (all
            preconditioned layers must then share one dtype). A different dtype works through
            copies.
        skip_layers: layers not to precondition, given as module names (as in
            ``model.named_modules()``; a name also skips its submodules), class names, module
            classes, or module objects.
        input_shapes: ``{name or module: spatial size}`` of convolution inputs, ``(H, W)`` for a
            Conv2d and ``L`` (or ``(L,)``) for a Conv1d. When every convolution is covered the
            layers are registered at construction; otherwise at the first training forward pass.

    Per-layer structure options (a value for every layer, or a dict ``{name or module: value}``):
        conv_approximation: ``'kfc'`` (full patch second moment) or ``'sua'`` (spatially
            uncorrelated activations) for the convolutions (unnamed convolutions use ``'kfc'``).
        input_group_size, output_group_size: channel grouping (channels, or features of a
            Linear, per block of the input-/output-side factor; 0 = none; unnamed layers: 0).

    Block-tridiagonal K-FAC (EXPERIMENTAL, ``kfac_layer_link``; Martens & Grosse 2015, §4.3):
        tridiagonal: link every pair of consecutive preconditioned ``nn.Linear`` layers (module
            order) whose sizes chain (``upper.in_features == lower.out_features``, no channel
            grouping), as in an ``nn.Sequential`` of Linear layers and activations: the step then
            uses the chains' block-tridiagonal inverse with factored (π) damping of the diagonal
            factors. Meant for plain chains; do not use it when a Linear does not consume the
            previous Linear's output. The pairing looks at module order and sizes only, so it
            cannot see skip connections: a residual block (``h + f(W h)``) whose sizes chain is
            linked without complaint although the chain model behind the approximation does not
            hold there. Not combinable with ``factor_damping_period > 0``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        # core
        lr: Union[None, float, Callable[[], float]] = None,
        damping: Optional[float] = None,
        factor_decay: Optional[float] = None,
        kl_clip: Optional[float] = None,
        factor_update_period: Optional[int] = None,
        inverse_update_period: Optional[int] = None,
        inverse_strategy: Union[None, str, int] = None,
        pi_damping: Optional[bool] = None,
        loss_reduction: Union[str, int] = "mean",
        output_grad_scale: Optional[float] = None,
        num_threads: Optional[int] = None,
        inverse_spread: Optional[bool] = None,
        async_inversion: Union[None, bool, str, int] = None,
        # adaptive
        lm_interval: Optional[int] = None,
        lm_decay: Optional[float] = None,
        factor_damping: Optional[float] = None,
        factor_damping_period: Optional[int] = None,
        factor_damping_decay: Optional[float] = None,
        damping_min: Optional[float] = None,
        factor_damping_ratio: Optional[float] = None,
        # EKFAC
        ekfac_decay: Optional[float] = None,
        ekfac_mode: Union[None, str, int] = None,
        # distributed (experimental)
        process_group=None,
        distributed_reduce: Union[None, str, int] = None,
        # layers
        dtype=None,
        skip_layers: Iterable = (),
        input_shapes: Optional[Dict] = None,
        # per-layer structure
        conv_approximation: Union[str, Dict] = "kfc",
        input_group_size: Union[int, Dict] = 0,
        output_group_size: Union[int, Dict] = 0,
        # block-tridiagonal
        tridiagonal: bool = False,
        # curvature (experimental)
        curvature: str = "fisher",
        mc_samples: int = 1,
    ):
        library_params = dict(
            damping=damping, factor_decay=factor_decay, kl_clip=kl_clip,
            factor_update_period=factor_update_period, inverse_update_period=inverse_update_period,
            inverse_strategy=inverse_strategy, pi_damping=pi_damping, loss_reduction=loss_reduction,
            output_grad_scale=output_grad_scale, num_threads=num_threads, lm_interval=lm_interval,
            lm_decay=lm_decay, factor_damping=factor_damping, factor_damping_period=factor_damping_period,
            factor_damping_decay=factor_damping_decay, inverse_spread=inverse_spread,
            async_inversion=async_inversion,
            damping_min=damping_min, factor_damping_ratio=factor_damping_ratio,
            ekfac_decay=ekfac_decay, ekfac_mode=ekfac_mode,
            distributed_reduce=distributed_reduce,
        )
        self.model = model
        self._tridiagonal = bool(tridiagonal)
        self._layers = discover_layers(model, skip_layers)
        configure_layers(self._layers, conv_approximation, input_group_size, output_group_size, input_shapes)
        self._dtype = layer_dtype(self._layers, dtype)

        self._lr_source: Optional[Callable[[], float]] = None
        self.optimizer = Optimizer(
            TORCH_TO_NUMPY[self._dtype],
            **{name: value for name, value in library_params.items() if value is not None},
        )
        if lr is not None:
            self.lr = lr
        # Distributed runs: the process group whose ranks share the statistics and inverses.
        self._process_group = None
        if process_group is not None:
            import torch.distributed as dist

            self._process_group = None if process_group is True else process_group
            self.optimizer.set_world(dist.get_rank(self._process_group), dist.get_world_size(self._process_group))
        # Statistics hooks: paused during the adaptive step's own forward passes; once
        # sampled_fisher_backward was used, ordinary backward passes record nothing.
        self._paused = False
        self._sampled_fisher = False
        self._in_sampled_backward = False
        self._loss_backward_recorded = False  # an ordinary backward recorded since the last step
        self._warned_second_backward = False
        self._sample_count = 0
        # Adaptive mode: directions written by step() and not yet used, and δ₀ (the last update
        # adaptive_step applied), one tensor per preconditioned parameter.
        self._directions_ready = False
        self._previous_update: Optional[List[torch.Tensor]] = None
        # Reusable buffers of the adaptive step (built at its first call): the directions of one
        # candidate and the update, per preconditioned parameter, in the library's dtype.
        self._adaptive_buffers = None
        # The last training forward pass's layer inputs and output (KeptForward), kept once
        # adaptive_step was used so that its products need not compute them again.
        self._keep_forward_values = False
        self._pending_forward = None
        self._forward_values = None
        self._registered = False
        if not self._missing_sizes():
            self._register()
        self._install_hooks()
        self._init_curvature(curvature, mc_samples)

    # -----------------------------------------------------------------------------------------
    # Step
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Replaces each preconditioned layer's ``.grad`` with its K-FAC direction.

        Call after ``loss.backward()`` and before ``optimizer.step()``. A layer that received no
        gradient this step counts as a zero gradient and its ``.grad`` stays ``None``. Raises
        :class:`libkfac.KFACError` if the library fails (e.g. no statistics were recorded before
        the first step, or no training forward pass registered the convolutions yet); then no
        gradient is changed.
        """
        if not self._registered:
            missing = self._missing_sizes()
            if missing:
                raise KFACError(
                    _lib.KFAC_ERROR_NO_STATISTICS,
                    "no training forward pass has been seen: the layers are registered with the "
                    "library at the first one (input size of "
                    f"{', '.join(repr(n) for n in missing)} unknown)",
                )
            self._register()
        if self._lr_source is not None:
            self.optimizer.learning_rate = float(self._lr_source())
        keep: List[torch.Tensor] = []  # buffers that must stay alive during the call
        write_back: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (grad, buffer) to copy back
        weight_addresses, bias_addresses = [], []
        for layer in self._layers:
            module = layer.module
            weight_addresses.append(self._grad_buffer(module.weight, keep, write_back))
            bias_addresses.append(
                self._grad_buffer(module.bias, keep, write_back) if module.bias is not None else 0
            )
        try:
            if self.optimizer.world[1] > 1:
                self.optimizer.synchronize(self._allreduce_sum, self._allgatherv)
            self.optimizer.handle.step(self.optimizer.handle.pointer_arrays(weight_addresses, bias_addresses))
        finally:
            for layer in self._layers:
                layer.saved_inputs.clear()
                layer.graph_inputs.clear()
            self._loss_backward_recorded = False
        for grad, buffer in write_back:
            grad.copy_(buffer)
        self._directions_ready = True

    def _allreduce_sum(self, array):
        """SUM-allreduces a packed buffer over the process group, in place: the tensor shares the
        array's memory (gloo). NCCL needs device tensors: the buffer goes through a host→device
        copy and back (2 copies of the pack per exchange)."""
        import torch.distributed as dist

        tensor = torch.from_numpy(array)
        if dist.get_backend(self._process_group) == "nccl":
            device_tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(device_tensor, op=dist.ReduceOp.SUM, group=self._process_group)
            tensor.copy_(device_tensor.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._process_group)
        return array

    def _allgatherv(self, mine, counts, displacements):
        """The inverse exchange: every rank's own units (``counts[r]`` values each) gathered
        in rank order. torch's ``all_gather`` needs equal sizes, so each segment is padded to the
        largest count (the only padding: world · max(counts) values instead of the SUM route's
        world · Σ counts); NCCL goes through the device as in :meth:`_allreduce_sum`."""
        import torch.distributed as dist

        width = max(counts)
        padded = torch.zeros(width, dtype=torch.from_numpy(mine).dtype)
        padded[: mine.size] = torch.from_numpy(mine)
        nccl = dist.get_backend(self._process_group) == "nccl"
        if nccl:
            padded = padded.to(torch.device("cuda", torch.cuda.current_device()))
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=self._process_group)
        if nccl:
            parts = [p.cpu() for p in parts]
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).numpy()

    def _grad_buffer(self, parameter: torch.Tensor, keep: list, write_back: list) -> int:
        """The address of a buffer holding ``parameter.grad`` that the library may overwrite:
        the gradient itself when possible, else a copy registered for writing back."""
        grad = parameter.grad
        if grad is None:
            buffer = torch.zeros(parameter.shape, dtype=self._dtype)
        elif grad.is_sparse:
            raise TypeError("KFACPreconditioner: sparse gradients are not supported")
        else:
            buffer = self._buffer(grad)
            if buffer.data_ptr() != grad.data_ptr():  # a copy: write the result back
                write_back.append((grad, buffer))
        keep.append(buffer)
        return buffer.data_ptr()

    # -----------------------------------------------------------------------------------------
    # Parameters (settable attributes, e.g. for schedulers)
    # -----------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """η of the KL clip: the learning rate the caller applies the directions with. May be
        set to a float or to a callable evaluated at each :meth:`step`."""
        if self._lr_source is not None:
            return float(self._lr_source())
        return self.optimizer.learning_rate

    @lr.setter
    def lr(self, value: Union[float, Callable[[], float]]) -> None:
        if callable(value):
            self._lr_source = value
            self.optimizer.learning_rate = float(value())
        else:
            self._lr_source = None
            self.optimizer.learning_rate = value

    @property
    def steps(self) -> int:
        """Number of completed :meth:`step` calls (the library's step counter)."""
        return self.optimizer.step_count

    @property
    def last_kl_scale(self) -> float:
        """ν of the last step (1.0 when the KL clip did not shrink the update; ``None`` before the first)."""
        return self.optimizer.last_kl_scale

    @property
    def last_reduction_ratio(self) -> float:
        """ρ of the last :meth:`adaptive_step` (``None`` before the first)."""
        return self.optimizer.last_reduction_ratio

    # -----------------------------------------------------------------------------------------
    # Cleanup
    # -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Removes the hooks and frees the library handle."""
        self.remove_hooks()
        self.optimizer.close()

    def __repr__(self) -> str:
        kinds = {}
        for layer in self._layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        summary = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        return (
            f"KFACPreconditioner({summary}, dtype={self._dtype}, "
            f"{'registered' if self._registered else 'not registered yet'}, "
            f"steps={self.steps if not self.optimizer.closed else 'closed'})"
        )


def _attribute(name: str):
    def getter(self):
        return self.optimizer.get_param(name)

    def setter(self, value):
        self.optimizer.set_param(name, value)

    return property(getter, setter, doc=f"The library's ``{name}`` parameter (settable).")


# Every library parameter is a settable attribute (e.g. for schedulers), except learning_rate,
# which is ``lr`` here.
for _name in PARAMETERS:
    if _name != "learning_rate":
        setattr(KFACPreconditioner, _name, _attribute(_name))
del _name
