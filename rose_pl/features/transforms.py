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
    """The Adam update direction under saved AdamW state (LESS/ROSE's training side).

    The state comes from, in this order: what it was built with (`from_optimizer`, `from_state_dict`), the
    `optimizer_state` argument (a checkpoint folder or an `optimizer.pt`), or the feature module's own checkpoint
    (a rose_pl warmup epoch or a Hugging Face Trainer checkpoint). betas and eps are read from the saved optimizer,
    never retyped; the state must cover every parameter whose gradient is taken, with its shape, and every one that
    does not is reported at once, by name.
    """

    def __init__(self, optimizer_state: str | None = None, betas: tuple[float, float] | None = None,
                 eps: float | None = None):
        """
        Args:
            optimizer_state: Where the Adam moments are: a rose_pl warmup epoch folder, a Hugging Face Trainer
                checkpoint folder, or an optimizer.pt (rose_pl's name-keyed state or torch's optimizer.state_dict());
                None: the feature module's checkpoint.
            betas: Adam betas, only for a state that does not record them (a plain state dict).
            eps: Adam epsilon, likewise.
        """
        self.optimizer_state, self.betas, self.eps = optimizer_state, betas, eps
        self._given: dict | None = None
        self._saved: dict | None = None
        self._module_key = None
        self._device_state: tuple[torch.device, dict] | None = None

    # ---- other ways in -----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict, betas: tuple[float, float] | None = None, eps: float | None = None,
                        parameter_names: list[str] | None = None) -> "AdamDirection":
        """From {parameter name: {"exp_avg", "exp_avg_sq"}}, or from torch's `optimizer.state_dict()` (then the
        names are taken from the module's trainable parameters, or `parameter_names` in the optimizer's order).
        betas and eps default to the state dict's param_groups when it has them."""
        out = cls(betas=betas, eps=eps)
        out._given = {"saved": state, "names": parameter_names}
        return out

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> "AdamDirection":
        """From a live torch optimizer (Adam or AdamW) over `model`'s parameters, keyed by `model`'s parameter
        names: e.g. the optimizer of a Lightning module at the end of an epoch."""
        from rose_pl.training.checkpoints import adam_hyperparameters, named_adam_state

        out = cls()
        out._given = {"saved": {"state": named_adam_state(model, optimizer), "hyper": adam_hyperparameters(optimizer)},
                      "names": None}
        return out

    @classmethod
    def from_checkpoint(cls, path: str) -> "AdamDirection":
        """From a checkpoint folder (rose_pl warmup epoch or Hugging Face Trainer) or an optimizer.pt."""
        return cls(optimizer_state=path)

    # ---- set-up ------------------------------------------------------------------------------------
    def _raw(self, module) -> tuple[dict, list[str] | None, str]:
        """(saved state as loaded, parameter names for an index-keyed state, where it came from)."""
        if self._given is not None:
            return self._given["saved"], self._given["names"], "the given optimizer state"
        if self.optimizer_state is not None:
            from pathlib import Path

            from rose_pl.training.sources import checkpoint_source

            path = Path(self.optimizer_state)
            if path.is_file():
                return torch.load(path, map_location="cpu", weights_only=True), None, str(path)
            return checkpoint_source(path).load_optimizer_state(), None, str(path)
        source = getattr(module, "source", None)
        return module.optimizer_state(), None, f"checkpoint {getattr(source, 'path', '?')}"

    def setup(self, module) -> None:
        from rose_pl.training.sources import check_state_covers, named_optimizer_state

        key = (id(module), str(getattr(getattr(module, "source", None), "path", None)))
        if self._saved is not None and self._module_key == key:
            return
        saved, names, where = self._raw(module)
        if names is None and hasattr(module, "trained_parameter_names"):
            names = module.trained_parameter_names()
        named = named_optimizer_state(saved, module.model, names, where=where)
        hyper = dict(named["hyper"])
        for name, value in (("betas", self.betas), ("eps", self.eps)):
            if value is not None:
                hyper[name] = list(value) if name == "betas" else float(value)
            elif name not in hyper:
                raise CheckpointError(f"{where}: records no Adam {name}; give AdamDirection({name}=...)")
        shapes = dict(module.gradient_shapes())
        check_state_covers(named["state"], shapes, where)
        self._saved = {"state": {n: named["state"][n] for n in shapes}, "hyper": hyper}
        self._module_key, self._device_state = key, None

    def _state_on(self, device: torch.device) -> dict:
        if self._device_state is None or self._device_state[0] != device:
            state = {n: (s["exp_avg"].to(device, torch.float32), s["exp_avg_sq"].to(device, torch.float32))
                     for n, s in self._saved["state"].items()}
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
            out["adam"] = {k: self._saved["hyper"][k] for k in ("betas", "eps") if k in self._saved["hyper"]}
            out["state"] = _state_id(self._saved["state"])
        return out


def _state_id(state: dict) -> str:
    """A short digest of the Adam moments (features under other moments never pass for these)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        for key in ("exp_avg", "exp_avg_sq"):
            flat = state[name][key].reshape(-1)
            digest.update(flat[:4096].to(torch.float32).numpy().tobytes())
            digest.update(flat[-4096:].to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
