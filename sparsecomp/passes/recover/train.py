"""One phase of training: AdamW on the trainable tensors with their zeros kept, the learning-rate
schedule by steps or wall clock, periodic validation with early stopping, and the best state so far."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .config import Recover
from .graphs import _Tensor

#: Fraction of a phase (steps or time) after which ``patience`` stops it on a mere plateau.
EARLY_STOP_FROM = 0.5
#: Before that, a validation this many times the phase's starting one counts as diverging (stops on patience).
DIVERGED = 1.5

# ------------------------------------------------------------------------------------------------ training loop
def _lr_factor(cfg: Recover, progress: float) -> float:
    if cfg.warmup > 0 and progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    p = (progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup)
    p = min(max(p, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return 1 - p
    return 1.0


class _Trainer:
    """Runs steps of one phase: AdamW, masked updates, lr schedule by steps or time, periodic validation."""

    def __init__(self, cfg: Recover, tensors: list[_Tensor], lr: float, total_steps: int,
                 deadline: float | None, validate: Callable[[], float], best: "_Best", label: str) -> None:
        self.cfg, self.tensors, self.lr = cfg, tensors, lr
        self.total, self.deadline, self.validate, self.best = max(1, total_steps), deadline, validate, best
        self.t0 = time.perf_counter()
        self.step_count, self.stale, self.stopped, self.label = 0, 0, False, label
        for t in tensors:
            t.tensor.requires_grad_(True)
        self.opt = torch.optim.AdamW([t.tensor for t in tensors], lr=lr, weight_decay=cfg.weight_decay)
        self.eval_every = cfg.eval_every
        self.start_score = best.score  # the best validation when the phase began

    def progress(self) -> float:
        p = self.step_count / self.total
        if self.deadline is not None:
            span = self.deadline - self.t0
            p = max(p, (time.perf_counter() - self.t0) / max(span, 1e-9))
        return min(p, 1.0)

    def done(self) -> bool:
        return self.stopped or self.progress() >= 1.0

    def step(self, loss: torch.Tensor) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr * _lr_factor(self.cfg, self.progress())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for t in self.tensors:
            if t.zeros is not None and t.tensor.grad is not None:
                t.tensor.grad.masked_fill_(t.zeros, 0)
        self.opt.step()
        with torch.no_grad():
            for t in self.tensors:
                if t.zeros is not None:
                    t.tensor.masked_fill_(t.zeros, 0)
        self.step_count += 1
        if self.eval_every and self.step_count % self.eval_every == 0:
            self.check()

    def check(self) -> float:
        score = self.validate()
        if self.best.offer(score, self.label):
            self.stale = 0
        else:
            self.stale += 1
            # a long phase's validation is noisy while its learning rate is high: before EARLY_STOP_FROM of
            # the phase only a diverging run (DIVERGED times worse than where the phase began) stops early
            if self.stale >= self.cfg.patience and (self.progress() >= EARLY_STOP_FROM
                                                    or score > DIVERGED * self.start_score):
                self.stopped = True
        return score

    def close(self) -> None:
        for t in self.tensors:
            t.tensor.requires_grad_(False)
            t.tensor.grad = None


class _Best:
    """The best validated state so far (a copy of every trainable tensor)."""

    def __init__(self, tensors: dict[str, _Tensor], score: float) -> None:
        self.tensors, self.score, self.label = tensors, score, "start"
        self.state = {k: t.tensor.detach().clone() for k, t in tensors.items()}
        self.history: list[tuple[str, float]] = [("start", score)]

    def offer(self, score: float, label: str) -> bool:
        self.history.append((label, score))
        if score < self.score:
            self.score, self.label = score, label
            self.state = {k: t.tensor.detach().clone() for k, t in self.tensors.items()}
            return True
        return False

    def restore(self) -> None:
        with torch.no_grad():
            for k, t in self.tensors.items():
                t.tensor.copy_(self.state[k])
