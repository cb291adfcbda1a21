"""Checkpoints of a preconditioner: the library's state image plus what the torch side keeps
(the convolutions' input sizes and the adaptive step's last update δ₀)."""

from __future__ import annotations

from typing import Dict

import torch

from ._registration import normalised_size


class StateMixin:
    """:meth:`state_dict` and :meth:`load_state_dict`."""

    def state_dict(self) -> Dict[str, object]:
        """The library's state image (factors, inverses, counters, parameters, the adaptive
        mode's state), the convolutions' input sizes and the last update of :meth:`adaptive_step`
        (δ₀), in a dict that ``torch.save`` can store. ``lr`` given as a callable is not
        included."""
        if not self._registered and not self._missing_sizes():
            self._register()
        previous = self._previous_update
        return {
            "kfac_state": self.optimizer.state_bytes(),
            "layers": [l.name for l in self._layers],
            "input_sizes": self.input_sizes,
            "previous_update": None if previous is None else [t.detach().cpu().clone() for t in previous],
        }

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        """Restores a :meth:`state_dict` taken from a preconditioner of the same layers and
        dtype; before the first forward pass it also takes the convolutions' input sizes from
        it. A callable ``lr`` stays in force."""
        image = state_dict["kfac_state"]
        if isinstance(image, torch.Tensor):  # tolerate images stored as uint8 tensors
            image = image.cpu().numpy().tobytes()
        if not self._registered:
            sizes = state_dict.get("input_sizes") or {}
            for layer in self._layers:
                if layer.is_conv and layer.input_size is None and layer.name in sizes:
                    layer.input_size = normalised_size(layer, sizes[layer.name])
            if not self._missing_sizes():
                self._register()
        self.optimizer.load_state(image)
        if self._lr_source is not None:
            self.optimizer.learning_rate = float(self._lr_source())
        # Directions are not part of a state image: the next adaptive_step needs a new step().
        self._directions_ready = False
        previous = state_dict.get("previous_update")
        try:
            params = self._adaptive_parameters()
        except ValueError:  # shared parameters: no adaptive mode
            previous = params = None
        if previous is not None and len(previous) == len(params) and all(
                tuple(t.shape) == tuple(p.shape) for t, p in zip(previous, params)):
            self._previous_update = [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(previous, params)]
        else:
            # Without δ₀ the next adaptive step chooses α alone (μ = 0), and the library's copy
            # of δ₀ is then replaced consistently.
            self._previous_update = None

