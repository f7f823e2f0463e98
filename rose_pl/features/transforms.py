"""Gradient transforms: what happens to each per-sample gradient block before it is projected or scored.

A transform wraps the module's gradient sink (see `per_sample_grads.GradientSink`); it is set up once per
module with the checkpoint it belongs to. The one built in is `AdamDirection`, LESS/ROSE's training side:
the per-sample gradient turned into the Adam update direction with the checkpoint's saved AdamW state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from rose_pl.errors import CheckpointError


def adam_direction(grad, exp_avg, exp_avg_sq, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """LESS's Adam update direction `m' / sqrt(v' + eps)` after one more step on `grad`.

    `m' = beta1 m + (1 - beta1) g`, `v' = beta2 v + (1 - beta2) g^2`; eps inside the root and no
    bias correction, as in LESS. `grad` may carry leading sample dims; the state broadcasts.
    """
    # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b: the moment updates in one kernel each.
    m = torch.lerp(exp_avg, grad, 1 - beta1)
    v = torch.lerp(exp_avg_sq, grad * grad, 1 - beta2)
    return m.div_(v.add_(eps).sqrt_())


class AdamTransformSink:
    """Applies `adam_direction` with each parameter's saved AdamW state before passing blocks on.

    `state[name] = (exp_avg, exp_avg_sq)`; betas and eps come from the saved optimizer, so they
    have no defaults here.
    """

    def __init__(self, inner, state: dict, beta1: float, beta2: float, eps: float):
        self.inner = inner
        self.state = state
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, num_samples: int, device: torch.device) -> None:
        self.inner.begin(num_samples, device)

    def _moments(self, name: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._on_device.get(name)
        if cached is None or cached[0].device != grad.device:
            if name not in self.state:
                raise CheckpointError(f"no Adam state for parameter {name!r} in the checkpoint")
            exp_avg, exp_avg_sq = (t.to(grad.device, torch.float32) for t in self.state[name])
            if exp_avg.shape != grad.shape[1:] or exp_avg_sq.shape != grad.shape[1:]:
                raise CheckpointError(
                    f"Adam state of {name!r} has shape {tuple(exp_avg.shape)}, parameter has {tuple(grad.shape[1:])}"
                )
            cached = self._on_device[name] = (exp_avg, exp_avg_sq)
        return cached

    def add(self, name: str, grad: torch.Tensor) -> None:
        exp_avg, exp_avg_sq = self._moments(name, grad)
        self.inner.add(name, adam_direction(grad, exp_avg, exp_avg_sq, self.beta1, self.beta2, self.eps))

    def finish(self):
        return self.inner.finish()


class GradientTransform(ABC):
    """Turns per-sample gradient blocks into features before the sink; subclass it to add one."""

    def setup(self, module) -> None:
        """Called once with the feature module (its checkpoint, `gradient_shapes()`) before the first batch."""

    @abstractmethod
    def wrap(self, sink, device: torch.device):
        """A sink that transforms each block, then hands it to `sink`."""

    def metadata(self) -> dict:
        """What defines the transform (stored with the features)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}"}


class AdamDirection(GradientTransform):
    """The Adam update direction under the checkpoint's saved AdamW state (LESS/ROSE's training side).

    betas and eps are read from the saved optimizer, never retyped; the state must cover every parameter
    whose gradient is taken.
    """

    def __init__(self):
        self._saved: dict | None = None
        self._path = None
        self._device_state: tuple[torch.device, dict] | None = None

    def setup(self, module) -> None:
        checkpoint = module.ckpt
        if self._saved is not None and self._path == checkpoint.path:
            return
        saved = checkpoint.load_optimizer_state()
        missing = sorted(set(module.gradient_shapes()) - set(saved["state"]))
        if missing:
            raise CheckpointError(
                f"{checkpoint.path}: optimizer state lacks {len(missing)} adapter parameters, e.g. {missing[0]}")
        self._saved, self._path, self._device_state = saved, checkpoint.path, None
        self._wanted = set(module.gradient_shapes())

    def _state_on(self, device: torch.device) -> dict:
        if self._device_state is None or self._device_state[0] != device:
            state = {n: (s["exp_avg"].to(device, torch.float32), s["exp_avg_sq"].to(device, torch.float32))
                     for n, s in self._saved["state"].items() if n in self._wanted}
            self._device_state = (device, state)
        return self._device_state[1]

    def wrap(self, sink, device: torch.device):
        if self._saved is None:
            raise RuntimeError("AdamDirection.wrap before setup(module)")
        beta1, beta2 = self._saved["hyper"]["betas"]
        return AdamTransformSink(sink, self._state_on(device), beta1=beta1, beta2=beta2, eps=self._saved["hyper"]["eps"])

    def metadata(self) -> dict:
        out = super().metadata()
        if self._saved is not None:
            out["adam"] = dict(self._saved["hyper"])
        return out
