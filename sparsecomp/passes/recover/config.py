"""The ``Recover`` config: what to train, for how long, on which loss; validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ...config import PassConfig, register_config
from ...errors import ConfigError

OUTPUT_LOSSES = ("mse", "cosine", "kl")
SCHEDULES = ("cosine", "linear", "constant")
AUGMENTATIONS = ("crop", "concat", "substitute")
_NAME = "Recover"
#: End-to-end epochs when neither ``epochs`` nor ``budget_s`` bounds the phase.
DEFAULT_EPOCHS = 4.0
#: With ``epochs=None`` and a budget, the most of the budget the block-wise phase may use.
BLOCK_SHARE = 0.25


@register_config
@dataclasses.dataclass(frozen=True)
class Recover(PassConfig):
    """Train the compressed graph to reproduce the original graph on the calibration data.

    Parameters
    ----------
    block_epochs:
        Passes over the training split for *each* block in the block-wise phase (0: no block phase).
    epochs:
        Passes over the training split in the end-to-end phase (0: no end-to-end phase). ``None``
        (default): with ``budget_s``, as many as the budget allows (the phase ends when the time is spent;
        its learning-rate schedule runs on the clock); without a budget, ``DEFAULT_EPOCHS``.
    budget_s:
        Wall-clock budget of the whole pass in seconds (``None``: only the epochs limit). With explicit
        ``epochs`` it is split between the phases in proportion to their epochs, and the learning-rate
        schedule follows whichever of steps and time runs out first; with ``epochs=None`` the block phase
        may use up to ``BLOCK_SHARE`` of it and the end-to-end phase the rest. A binding budget makes the
        number of steps depend on the machine's speed.
    lr, block_lr:
        AdamW learning rates of the end-to-end and block phases (``block_lr=None``: ``lr``).
    schedule:
        ``"cosine"`` (default), ``"linear"`` decay to 0, or ``"constant"``; after a linear ``warmup``
        (fraction of the phase).
    weight_decay:
        AdamW's decoupled weight decay (decays toward 0; zeros stay zeros).
    batch_size:
        Samples per step. Token batches are padded to their longest sample, not to the captured length,
        when the sequence dimension was captured dynamic.
    output_loss:
        ``"mse"`` (relative: ``||s - t||^2 / ||t||^2``), ``"cosine"`` (1 - cosine along the last dim) or
        ``"kl"`` (KL of softmax over the last dim, for logits) on every float output.
    intermediate_weight:
        Weight of the relative MSE at block outputs in the end-to-end loss (0: outputs only).
    val_fraction:
        Fraction of the calibration samples held out for validation and early stopping (0 < f < 1).
    eval_every:
        Validate every this many optimizer steps (0: twice per epoch of each phase).
    patience:
        Stop a phase after this many validations without improvement: in its first half only when the
        last validation is 1.5x worse than where the phase began (training diverges); after that on any
        plateau. The best validated weights are kept either way.
    augment:
        Token-sequence augmentations of training samples (need ``token_mask``): ``"crop"`` (a random
        contiguous part, first and last token kept), ``"concat"`` (two samples joined, the first's last
        and the second's first token dropped), ``"substitute"`` (15% of inner tokens replaced by tokens of
        other samples). The teacher labels every augmented sample; half the end-to-end batches are
        augmented. Default: all three (they apply only to token inputs captured with a dynamic sequence
        length); ``()`` turns them off.
    token_mask:
        Name of the input that marks real tokens (e.g. ``"attention_mask"``); losses skip padding.
    train_embeddings:
        Also train weights read by ``aten.embedding`` (frozen by default).
    seed:
        Seeds the split, the batch order and the augmentations. Same seed, same steps: same weights.
    progress:
        Show tqdm progress bars for the phases.
    """

    type_name: ClassVar[str] = _NAME

    block_epochs: float = 2.0
    epochs: float | None = None
    budget_s: float | None = None
    lr: float = 3e-4
    block_lr: float | None = None
    schedule: str = "cosine"
    warmup: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 16
    output_loss: str = "mse"
    intermediate_weight: float = 1.0
    val_fraction: float = 0.1
    eval_every: int = 0
    patience: int = 4
    augment: tuple[str, ...] = AUGMENTATIONS
    token_mask: str | None = "attention_mask"
    train_embeddings: bool = False
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.augment, str):
            object.__setattr__(self, "augment", (self.augment,))
        object.__setattr__(self, "augment", tuple(self.augment))
        for name in ("block_epochs", "epochs", "lr", "warmup", "weight_decay", "intermediate_weight"):
            v = getattr(self, name)
            if v is None and name == "epochs":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"Recover.{name} must be a finite number >= 0, got {v!r}")
        if self.block_lr is not None and (not isinstance(self.block_lr, (int, float)) or self.block_lr <= 0):
            raise ConfigError(f"Recover.block_lr must be > 0 or None, got {self.block_lr!r}")
        if self.lr <= 0:
            raise ConfigError(f"Recover.lr must be > 0, got {self.lr!r}")
        if self.warmup >= 1:
            raise ConfigError(f"Recover.warmup is a fraction of a phase, in [0, 1), got {self.warmup!r}")
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                                          or not self.budget_s > 0):
            raise ConfigError(f"Recover.budget_s must be > 0 seconds or None, got {self.budget_s!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"Recover.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise ConfigError(f"Recover.output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        for name in ("batch_size", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Recover.{name} must be an int >= 1, got {v!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"Recover.eval_every must be an int >= 0, got {self.eval_every!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError(f"Recover.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise ConfigError(f"Recover.augment: unknown {bad}; valid: {AUGMENTATIONS}")
        if self.block_epochs == 0 and self.epochs == 0:
            raise ConfigError("Recover needs block_epochs > 0 or epochs > 0")

    @property
    def e2e_epochs(self) -> float | None:
        """Epochs of the end-to-end phase: ``epochs``; for ``epochs=None``, ``None`` (until the budget is
        spent) when there is a budget, else ``DEFAULT_EPOCHS``."""
        if self.epochs is not None:
            return float(self.epochs)
        return None if self.budget_s is not None else DEFAULT_EPOCHS

    @property
    def needs_calibration(self) -> bool:
        return True
