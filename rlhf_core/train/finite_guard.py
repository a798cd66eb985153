"""The weight half of the non-finite guard: an optimizer step that leaves a non-finite weight is undone.

Why: the loss and gradient checks cannot see an update that overflows on its own (``--learning_rate`` far too
high, a bf16 weight past its range): the gradients are finite, the step is taken, and every later step trains
NaN weights. The runner keeps the trained parameters in one flat buffer (``flat_params``), so the check is
one ``isfinite().all()`` over it (one kernel, one host sync); the undo needs the state from before the step,
kept in buffers allocated once and overwritten each step (parameters and AdamW moments: three copies of the
trained parameters, a few memcpy per optimizer step; ``--weight_guard check`` keeps none and fails the run
at the first non-finite weight instead).
"""
from __future__ import annotations

from typing import Any

import torch

# consecutive optimizer steps whose weights went non-finite (each undone) before the run stops as failed
MAX_NONFINITE_UPDATES = 3


class WeightGuard:
    """Saves the flat parameter buffer and its optimizer state before a step; restores them on request.
    With ``keep=False`` it only checks (no copies, no memory): :meth:`save` does nothing."""

    def __init__(self, buffer: torch.Tensor, optimizer: torch.optim.Optimizer, keep: bool = True):
        self.buffer = buffer
        self.optimizer = optimizer
        self.keep = keep
        self._params: torch.Tensor | None = None
        self._state: dict[str, Any] = {}
        self._had_state = False

    @torch.no_grad()
    def save(self) -> None:
        """Copy the parameters and the optimizer's state of the buffer (before ``optimizer.step()``)."""
        if not self.keep:
            return
        if self._params is None:
            self._params = torch.empty_like(self.buffer)
        self._params.copy_(self.buffer)
        state = self.optimizer.state.get(self.buffer, {})
        self._had_state = bool(state)
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                kept = self._state.get(key)
                if not isinstance(kept, torch.Tensor) or kept.shape != value.shape or kept.dtype != value.dtype:
                    kept = self._state[key] = torch.empty_like(value)
                kept.copy_(value)
            else:
                self._state[key] = value

    @torch.no_grad()
    def finite(self) -> bool:
        """Whether every parameter is finite: one reduction over the buffer."""
        return bool(torch.isfinite(self.buffer).all().item())

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what :meth:`save` copied: the parameters and the optimizer state (none before the first
        step, so AdamW starts afresh as it would have)."""
        if self._params is None:
            raise RuntimeError("WeightGuard.restore() before save()")
        self.buffer.copy_(self._params)
        if not self._had_state:
            self.optimizer.state.pop(self.buffer, None)
            return
        state = self.optimizer.state[self.buffer]
        for key, kept in self._state.items():
            if isinstance(kept, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                state[key].copy_(kept)
            else:
                state[key] = kept
