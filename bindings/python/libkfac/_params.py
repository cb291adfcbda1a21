"""The parameter table: name -> (``kfac_param`` id, ``"double"`` or ``"int"``)."""

from __future__ import annotations

from . import _lib

__all__ = ["PARAMETERS"]

# Parameter name -> (kfac_param value, "double" or "int").
PARAMETERS = {
    "learning_rate": (_lib.KFAC_PARAM_LEARNING_RATE, "double"),
    "damping": (_lib.KFAC_PARAM_DAMPING, "double"),
    "factor_decay": (_lib.KFAC_PARAM_FACTOR_DECAY, "double"),
    "kl_clip": (_lib.KFAC_PARAM_KL_CLIP, "double"),
    "output_grad_scale": (_lib.KFAC_PARAM_OUTPUT_GRAD_SCALE, "double"),
    "lm_decay": (_lib.KFAC_PARAM_LM_DECAY, "double"),
    "factor_damping": (_lib.KFAC_PARAM_FACTOR_DAMPING, "double"),
    "factor_damping_decay": (_lib.KFAC_PARAM_FACTOR_DAMPING_DECAY, "double"),
    "factor_update_period": (_lib.KFAC_PARAM_FACTOR_UPDATE_PERIOD, "int"),
    "inverse_update_period": (_lib.KFAC_PARAM_INVERSE_UPDATE_PERIOD, "int"),
    "inverse_strategy": (_lib.KFAC_PARAM_INVERSE_STRATEGY, "int"),
    "pi_damping": (_lib.KFAC_PARAM_PI_DAMPING, "int"),
    "loss_reduction": (_lib.KFAC_PARAM_LOSS_REDUCTION, "int"),
    "num_threads": (_lib.KFAC_PARAM_NUM_THREADS, "int"),
    "lm_interval": (_lib.KFAC_PARAM_LM_INTERVAL, "int"),
    "factor_damping_period": (_lib.KFAC_PARAM_FACTOR_DAMPING_PERIOD, "int"),
}
BY_ID = {value: (name, kind) for name, (value, kind) in PARAMETERS.items()}
