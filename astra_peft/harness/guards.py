"""Stop a run the moment a number stops being true: a non-finite loss, gradient or weight ends training with an
error naming the step, before the optimizer applies it, before it is logged and before a checkpoint keeps it.

Without this, transformers' Trainer replaces a NaN loss by the running average in its logs (its
`logging_nan_inf_filter`), so a run whose every weight is NaN could report a train loss of 0.0 and exit 0.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .validation import UserError


class NonFiniteTraining(UserError):
    """Training produced NaN or infinite values. Not a bug of ours: the settings (learning rate, alpha) or the
    model make the run diverge; the message names the step and what went wrong."""


_ADVICE = "the run diverged; lower --lr (or the method's lr/alpha), or check the model and data"


def _first_bad(named_tensors) -> str | None:
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class FiniteGuard(TrainerCallback):
    """Checks, in this order: every weight before the first step (an initialisation with alpha=inf leaves NaN in
    the base), every gradient before each optimizer step, every trainable weight after it, and the logged loss and
    gradient norm. Raises NonFiniteTraining (a UserError) naming the step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and (bad := _first_bad(model.named_parameters())):
            raise NonFiniteTraining(f"before training (step {state.global_step}): weight {bad} is NaN or infinite "
                                    f"after initialisation; check --alpha/--rank and the method's options")

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = ((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
        if bad := _first_bad(grads):
            raise NonFiniteTraining(f"training stopped at step {state.global_step + 1}: the gradient of {bad} is "
                                    f"NaN or infinite (loss or activations overflowed); {_ADVICE}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if bad := _first_bad((n, p) for n, p in model.named_parameters() if p.requires_grad):
            raise NonFiniteTraining(f"training stopped at step {state.global_step}: weight {bad} became NaN or "
                                    f"infinite after the optimizer step; {_ADVICE}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTraining(f"training stopped at step {state.global_step}: the {key.replace('_', ' ')} "
                                        f"is {value}; {_ADVICE}")
        for key, value in (logs or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteTraining(f"at step {state.global_step}: {key} is {value}; {_ADVICE}")
