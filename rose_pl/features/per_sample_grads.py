"""Exact per-sample gradients of trainable nn.Linear parameters (LoRA A/B) in one backward pass.

For a Linear `y = x W^T + b`, the gradient of row r is `sum_t grad_y[r,t] x[r,t]^T`. A forward
hook keeps each trainable Linear's input, a hook on its output receives `grad_y` during one
backward of `losses.sum()`, and the per-row gradient is formed right there, reduced from rows to
samples and handed to a sink. Rows of a causal LM do not interact (no batch norm; dropout must be
off, i.e. eval mode), so this equals a loop of per-sample backward passes, and right padding
contributes nothing because padded positions receive zero gradient.

Limits: gradient checkpointing is refused (its recomputation re-runs the forward hooks); a
parameter shared by two different modules is refused; a module called several times per
forward (a reused layer) is supported and its calls are summed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from rose_pl.features.objectives import Objective


class GradientSink(Protocol):
    """Receives per-sample gradient blocks as soon as each is ready (see docs/architecture.md)."""

    def begin(self, num_samples: int, device: torch.device) -> None: ...

    def add(self, name: str, grad: torch.Tensor) -> None: ...

    def finish(self): ...


class BlockSink:
    """Collects blocks into `{name: (S, *shape)}` in the given name order (no projection)."""

    def __init__(self, names: list[str]):
        self.names = names

    def begin(self, num_samples: int, device: torch.device) -> None:
        self.blocks: dict[str, torch.Tensor] = {}

    def add(self, name: str, grad: torch.Tensor) -> None:
        self.blocks[name] = grad

    def finish(self) -> dict[str, torch.Tensor]:
        return {name: self.blocks[name] for name in self.names}


@dataclass(eq=False)
class _LinearState:
    """Per-module bookkeeping for one `compute` call."""

    name: str
    module: nn.Linear
    weight: str | None
    bias: str | None
    calls: int = 0
    pending: int = 0
    emitted: bool = False
    acc: dict[str, torch.Tensor] = field(default_factory=dict)


def _trainable_linears(model: nn.Module, parameters: dict[str, nn.Parameter]) -> list[_LinearState]:
    """Map each parameter to the nn.Linear owning it, refusing anything the hooks cannot handle."""
    owners: dict[int, dict[int, tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), {})[id(module)] = (module_name, module, attr)
    states: dict[int, _LinearState] = {}
    for name, param in parameters.items():
        found = list(owners.get(id(param), {}).values())
        if not found:
            raise ValueError(f"parameter {name!r} is not a parameter of the model")
        if not param.requires_grad:
            raise ValueError(f"parameter {name!r} does not require grad")
        if len(found) > 1:
            raise NotImplementedError(
                f"parameter {name!r} is shared by modules {[f[0] for f in found]}: per-sample gradients of "
                "tied parameters are not supported"
            )
        module_name, module, attr = found[0]
        plain_linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        if not plain_linear or attr not in ("weight", "bias"):
            raise NotImplementedError(
                f"parameter {name!r} belongs to {type(module).__name__} {module_name!r}: per-sample gradients are "
                "only implemented for the weight and bias of plain nn.Linear modules (e.g. LoRA A/B); "
                "freeze it or pass `parameters=` without it"
            )
        state = states.setdefault(id(module), _LinearState(module_name, module, None, None))
        setattr(state, attr, name)
    return list(states.values())


class PerSampleGradients:
    """Batched exact per-sample gradients of a model's trainable Linear parameters.

    Call with the model in eval mode (dropout off). After `compute`, `last_losses` holds the
    per-sample losses of that batch.
    """

    def __init__(
        self,
        model: nn.Module,
        parameters: dict[str, nn.Parameter] | None = None,
        compute_dtype: torch.dtype | None = torch.float32,
    ):
        """
        Args:
            model: the (peft-wrapped) model the objective runs.
            parameters: name -> parameter to differentiate; default all `requires_grad` parameters
                by `named_parameters()` name.
            compute_dtype: dtype of the per-row outer products; None keeps the activation dtype
                (faster in bf16 on GPU). Results are float32 either way.
        """
        self.model = model
        if parameters is None:
            parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not parameters:
            raise ValueError("PerSampleGradients: the model has no trainable parameters")
        self.parameters = dict(parameters)
        self.compute_dtype = compute_dtype
        self._states = _trainable_linears(model, self.parameters)
        self.last_losses: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        """Parameter names in the order results are returned."""
        return list(self.parameters)

    @contextmanager
    def _hooks(self):
        handles = [s.module.register_forward_hook(self._forward_hook(s)) for s in self._states]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, state: _LinearState):
        def hook(module, inputs, output):
            # Forwards without grad (the DPO reference, evaluation) must leave no trace.
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            state.calls += 1
            state.pending += 1
            holder = [inputs[0].detach()]

            def on_grad(grad_out):
                self._accumulate(state, holder.pop(), grad_out)  # pop: free the activation now
                state.pending -= 1
                if state.pending == 0:
                    self._emit(state)

            output.register_hook(on_grad)

        return hook

    def _accumulate(self, state: _LinearState, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[0] != self._num_rows:
            raise ValueError(
                f"module {state.name!r} got input of shape {tuple(x.shape)}; per-sample gradients need the "
                f"batch rows ({self._num_rows}) as its first dimension"
            )
        dtype = self.compute_dtype or x.dtype
        rows = x.shape[0]
        x = x.reshape(rows, -1, x.shape[-1]).to(dtype)
        g = grad_out.reshape(rows, -1, grad_out.shape[-1]).to(dtype)
        blocks = {}
        if state.weight is not None:
            blocks[state.weight] = torch.bmm(g.transpose(1, 2), x)  # (rows, out, in): sum over tokens
        if state.bias is not None:
            blocks[state.bias] = g.sum(1)
        for name, per_row in blocks.items():
            per_row = per_row.float()
            if self._row_to_sample is not None:
                per_row = per_row.new_zeros((self._num_samples, *per_row.shape[1:])).index_add_(
                    0, self._row_to_sample, per_row
                )
            state.acc[name] = per_row if name not in state.acc else state.acc[name] + per_row

    def _emit(self, state: _LinearState) -> None:
        for name in (state.weight, state.bias):
            if name is not None:
                param = self.parameters[name]
                grad = state.acc.pop(name, None)
                if grad is None:  # called, but no call's output reached the loss
                    grad = torch.zeros((self._num_samples, *param.shape), device=param.device)
                self._sink.add(name, grad)
        state.emitted = True

    def compute(self, objective: Objective, batch: dict[str, torch.Tensor], sink: GradientSink | None = None):
        """Per-sample gradients of `objective(model, batch)`.

        Without a sink, returns `{name: (S, *param.shape) float32}` in `names` order; with one,
        calls `sink.begin(S, device)`, `sink.add(name, grad)` per parameter as soon as it is ready,
        and returns `sink.finish()`. Parameters' `.grad` fields are left untouched.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "per-sample gradients cannot run under inference mode: use Trainer(inference_mode=False)"
            )
        # The module flag, not the model property: it exists across transformers versions.
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            raise NotImplementedError("per-sample gradients do not support gradient checkpointing: disable it")
        for state in self._states:
            state.calls = state.pending = 0
            state.emitted = False
            state.acc = {}
        self._sink = sink if sink is not None else BlockSink(self.names)
        try:
            with self._hooks(), torch.enable_grad():
                result = objective(self.model, batch)
                losses = result.losses
                if losses.dim() != 1:
                    raise ValueError(
                        f"objective {objective!r} returned losses of shape {tuple(losses.shape)}, expected (S,)"
                    )
                self._num_samples = losses.shape[0]
                self._row_to_sample = result.row_to_sample
                self._num_rows = self._num_samples if result.row_to_sample is None else result.row_to_sample.shape[0]
                never_ran = [s.name for s in self._states if s.calls == 0]
                if never_ran:
                    raise ValueError(
                        f"trainable modules {never_ran} did not run with grad in the forward pass (merged or "
                        "disabled adapter?): their per-sample gradients would be silently zero"
                    )
                self._sink.begin(self._num_samples, losses.device)
                # autograd.grad rather than backward: it returns the (discarded) summed gradients
                # instead of accumulating them into the parameters' .grad.
                torch.autograd.grad(losses.sum(), list(self.parameters.values()), allow_unused=True)
            for state in self._states:
                if not state.emitted:
                    self._emit(state)
            self.last_losses = losses.detach().float()
            return self._sink.finish()
        finally:
            for state in self._states:
                state.acc = {}
            self._sink = self._row_to_sample = None
