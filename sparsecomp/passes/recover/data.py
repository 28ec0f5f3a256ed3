"""Recover's data: calibration batches split into samples (trimmed to their real length), collated,
augmented and bucketed into training batches; and the losses, over real tokens only."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch
import torch.fx as fx

from ...calibration.data import flat_batches
from ...capture.export import Captured, is_symbolic
from ...errors import PassError
from .config import _NAME, Recover

# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class _Data:
    """Calibration samples as flat input lists of batch 1, trimmed to their real length when possible."""

    samples: list[list[Any]]
    mask_index: int | None        # placeholder index of the token mask
    seq_inputs: list[int]         # placeholder indices of tensors laid out like the mask (padded together)
    pad_values: dict[int, Any]    # per seq input, the value it holds at padding positions
    dynamic_seq: bool
    id_input: int | None          # the token-id input (integer, most distinct values) for substitutions
    max_len: int


def _prepare_data(gm: fx.GraphModule, calibration: Any, captured: Captured, cfg: Recover) -> _Data:
    batches = flat_batches(calibration, captured)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders]
    mask_index = names.index(cfg.token_mask) if cfg.token_mask in names else None
    dynamic_seq = False
    if mask_index is not None:
        val = placeholders[mask_index].meta.get("val")
        dynamic_seq = isinstance(val, torch.Tensor) and val.dim() >= 2 and is_symbolic(val.shape[1])
    samples, seq_inputs, pad_values = [], set(), {}
    for flat in batches:
        tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not tensors:
            raise PassError(_NAME, "calibration batches hold no tensors")
        b = tensors[0].shape[0]
        mask = flat[mask_index] if mask_index is not None else None
        if mask is not None:
            for i, t in enumerate(flat):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == mask.shape[:2]:
                    seq_inputs.add(i)
                    pad = t[mask == 0]
                    if pad.numel() and i not in pad_values:
                        pad_values[i] = pad.reshape(-1)[0].item()
        for r in range(b):
            sample = [t[r:r + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t
                      for t in flat]
            if mask is not None and dynamic_seq:
                real = torch.nonzero(sample[mask_index][0]).flatten()
                length = max(int(real[-1]) + 1 if real.numel() else 0, 2)
                sample = [t[:, :length] if i in seq_inputs else t for i, t in enumerate(sample)]
            samples.append(sample)
    seq = sorted(seq_inputs)
    ints = [i for i in seq if i != mask_index and not samples[0][i].is_floating_point()]
    id_input = max(ints, key=lambda i: len(torch.unique(torch.cat([s[i].flatten() for s in samples]))), default=None)
    max_len = max((s[mask_index].shape[1] for s in samples), default=0) if mask_index is not None else 0
    return _Data(samples, mask_index, seq, pad_values, dynamic_seq, id_input, max_len)


def _collate(data: _Data, samples: list[list[Any]]) -> list[Any]:
    out = []
    for i in range(len(samples[0])):
        parts = [s[i] for s in samples]
        if not isinstance(parts[0], torch.Tensor) or parts[0].dim() == 0:
            out.append(parts[0])
            continue
        if i in data.seq_inputs:
            width = max(p.shape[1] for p in parts)
            pad = data.pad_values.get(i, 0)
            parts = [torch.cat([p, p.new_full((1, width - p.shape[1], *p.shape[2:]), pad)], 1)
                     if p.shape[1] < width else p for p in parts]
        out.append(torch.cat(parts, 0))
    return out


def _trim(value: torch.Tensor, length: int | None, mask: torch.Tensor | None) -> torch.Tensor:
    """One sample's activation, cut to the sample's real ``length`` where it is laid out like the mask."""
    if length is None or mask is None or value.dim() < 2 or value.shape[1] != mask.shape[1]:
        return value.clone()
    return value[:, :length].clone()


def _collate_acts(acts: list[torch.Tensor], mask_len: int | None) -> torch.Tensor:
    if mask_len is None or acts[0].dim() < 2:
        return torch.cat(acts, 0)
    width = max(a.shape[1] for a in acts)
    return torch.cat([torch.cat([a, a.new_zeros((1, width - a.shape[1], *a.shape[2:]))], 1)
                      if a.shape[1] < width else a for a in acts], 0)


def _augment(data: _Data, sample: list[Any], other: list[Any], kind: str, rng: random.Random,
             vocab: torch.Tensor | None) -> list[Any]:
    """One augmented copy of ``sample`` (token sequences; the first and last token of each are kept)."""
    mi = data.mask_index
    length = sample[mi].shape[1]
    if kind == "crop":
        if length <= 4:
            return sample
        keep = rng.randint(max(1, (length - 2) // 2), length - 3)
        start = rng.randint(1, length - 1 - keep)
        idx = torch.tensor([0, *range(start, start + keep), length - 1])
        return [t.index_select(1, idx) if i in data.seq_inputs else t for i, t in enumerate(sample)]
    if kind == "concat":
        lo = other[mi].shape[1]
        if length + lo - 2 > data.max_len:
            return sample
        return [torch.cat([t[:, :length - 1], other[i][:, 1:]], 1) if i in data.seq_inputs else t
                for i, t in enumerate(sample)]
    if kind == "substitute" and data.id_input is not None and vocab is not None and length > 2:
        ids = sample[data.id_input].clone()
        inner = list(range(1, length - 1))
        for p in rng.sample(inner, max(1, round(0.15 * len(inner)))):
            ids[0, p] = vocab[rng.randrange(len(vocab))]
        return [ids if i == data.id_input else t for i, t in enumerate(sample)]
    return sample


def _batches(data: _Data, idx: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar lengths (shuffle, sort chunks of 8 batches by length, shuffle batches)."""
    order = list(idx)
    rng.shuffle(order)
    if data.dynamic_seq and data.mask_index is not None:
        chunk = batch_size * 8
        length = lambda i: data.samples[i][data.mask_index].shape[1]  # noqa: E731
        order = [i for k in range(0, len(order), chunk) for i in sorted(order[k:k + chunk], key=length)]
    out = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------ losses
def _token_weights(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or value.dim() < mask.dim() or value.shape[:mask.dim()] != mask.shape:
        return None
    return mask.to(value.dtype).reshape(*mask.shape, *([1] * (value.dim() - mask.dim())))


def relative_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``||s - t||^2 / ||t||^2`` over real tokens (padding positions of ``mask`` are ignored)."""
    w = _token_weights(t, mask)
    d = (s - t) ** 2
    e = t ** 2
    if w is not None:
        d, e = d * w, e * w
    return d.sum() / e.sum().clamp_min(1e-12)


def output_loss(kind: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if kind == "mse" or s.dim() == 0:
        return relative_mse(s, t, mask)
    if kind == "cosine":
        per = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    else:
        per = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                         reduction="none").sum(-1)
    w = _token_weights(per, mask)
    if w is None:
        return per.mean()
    return (per * w).sum() / w.sum().clamp_min(1)
