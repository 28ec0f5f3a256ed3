"""Recover: distil the compressed graph from the original one (the teacher) on unlabeled calibration data.

Runs last in a ``compress([...])`` list, after any combination of ``StructuredPruning`` / ``LowRank`` /
``Sparsify``: it needs the graph as captured before the first pass (``PassContext.original``), which
``compress`` hands to it. The user's model and the teacher graph are never modified.

1. **Correspondence.** A module of the original model whose scope has a single output node (a float
   tensor) *corresponds* when the compressed graph has the same module path (``nn_module_stack``) with one
   output of the same shape: widths the earlier passes pruned do not correspond, residual streams and block
   outputs do. The *blocks* are the longest run of sibling modules (``encoder.layer.0``, ``...1``, ...)
   that all correspond and where each block reads the previous block's output (never model names).
2. **Block-wise phase** (BRECQ-like): block ``i`` alone, fed the teacher's output of block ``i - 1``,
   learns the teacher's output of block ``i``; the teacher's block outputs are computed once and cached
   per sample, and the training graph of one block is the compressed graph cut at its input (only that
   block runs, so memory is one block's activations of one batch).
3. **End-to-end phase**: the whole compressed graph, loss on the outputs (``output_loss``) plus the
   relative MSE at every block output, against the teacher run on the same (optionally augmented) batch.

What earlier passes decided is kept: shapes never change (only tensor values are trained); a weight
entry (of a >= 2-D weight, or a packed sparse ``values`` tensor) that is exactly zero stays exactly zero
(masked gradients and a re-mask after each step: unstructured, block and N:M masks are preserved);
``sparse_linear_*`` ops train their packed ``values`` through a differentiable scatter into the dense
weight, so their index arrays never change; low-rank factors are two parameters and stay two;
BatchNorm runs in its captured inference form (statistics are buffers, never updated). Embedding tables
(weights read by ``aten.embedding``) are frozen unless ``train_embeddings``: only the rows of tokens in
the calibration text would move.

A held-out split of the calibration samples (``val_fraction``) measures output fidelity before, after
each phase and every ``eval_every`` steps; the best state is kept (early stopping with ``patience``), and
if no state beats the starting point, the starting (refit) weights are returned and the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx

from ..calibration.data import flat_batches, progress_bar
from ..capture.export import Captured, concrete_shape, is_symbolic
from ..config import PassConfig, register_config
from ..errors import ConfigError, PassError
from .base import PassContext, PassResult, register_pass

OUTPUT_LOSSES = ("mse", "cosine", "kl")
SCHEDULES = ("cosine", "linear", "constant")
AUGMENTATIONS = ("crop", "concat", "substitute")
_SPARSE_OPS = ("sparse_linear_csr", "sparse_linear_bsr", "sparse_linear_nm")
_EMBEDDING = torch.ops.aten.embedding.default
_NAME = "Recover"


@register_config
@dataclasses.dataclass(frozen=True)
class Recover(PassConfig):
    """Train the compressed graph to reproduce the original graph on the calibration data.

    Parameters
    ----------
    block_epochs:
        Passes over the training split for *each* block in the block-wise phase (0: no block phase).
    epochs:
        Passes over the training split in the end-to-end phase (0: no end-to-end phase).
    budget_s:
        Wall-clock budget of the whole pass in seconds (``None``: only the epochs limit). Split between the
        phases in proportion to their epochs; the learning-rate schedule follows whichever of steps and
        time runs out first. A binding budget makes the number of steps depend on the machine's speed.
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
        Stop a phase after this many validations without improvement.
    augment:
        Token-sequence augmentations of training samples (need ``token_mask``): ``"crop"`` (a random
        contiguous part, first and last token kept), ``"concat"`` (two samples joined, the first's last
        and the second's first token dropped), ``"substitute"`` (15% of inner tokens replaced by tokens of
        other samples). The teacher labels every augmented sample.
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
    epochs: float = 4.0
    budget_s: float | None = None
    lr: float = 1e-4
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
    augment: tuple[str, ...] = ()
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
    def needs_calibration(self) -> bool:
        return True


# ------------------------------------------------------------------------------------------------ correspondence
def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def module_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``{module path: its single output node}`` for every module scope of ``gm`` with exactly one output
    that is a float tensor (a node of the scope used outside it)."""
    members: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            for p in _scopes(n):
                if p:
                    members.setdefault(p, set()).add(n)
    out = {}
    for path, nodes in members.items():
        leaving = [n for n in nodes if any(u not in nodes for u in n.users)]
        if len(leaving) == 1:
            val = leaving[0].meta.get("val")
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                out[path] = leaving[0]
    return out


def _scope_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and path in _scopes(n)]


def _sibling_key(path: str) -> tuple[str, int] | None:
    parent, _, last = path.rpartition(".")
    return (parent, int(last)) if last.isdigit() else None


def corresponding_blocks(student: fx.GraphModule, teacher: fx.GraphModule) -> tuple[list[str], str]:
    """The chain of blocks shared by both graphs (module paths in order) and a reason when it is empty.

    Candidates are numbered sibling modules (``parent.0``, ``parent.1``, ...) with one output each, of the
    same shape in both graphs; consecutive ones form a chain when block ``k + 1`` reads block ``k``'s
    output. The longest chain (>= 2 blocks) wins.
    """
    s_out, t_out = module_outputs(student), module_outputs(teacher)
    families: dict[str, list[tuple[int, str]]] = {}
    for path, node in s_out.items():
        key = _sibling_key(path)
        t = t_out.get(path)
        if key is None or t is None or concrete_shape(node) != concrete_shape(t):
            continue
        families.setdefault(key[0], []).append((key[1], path))
    best: list[str] = []
    for _, items in sorted(families.items()):
        items.sort()
        run: list[str] = []
        for _, path in items:
            if run:
                scope = set(_scope_nodes(student, path))
                prev = s_out[run[-1]]
                if not any(u in scope for u in prev.users):
                    run = []
            run.append(path)
            if len(run) > len(best):
                best = list(run)
    if len(best) < 2:
        return [], "no chain of >= 2 corresponding blocks (same module path and output shape in both graphs)"
    return best, ""


# ------------------------------------------------------------------------------------------------ training graphs
def _densify(values: torch.Tensor, positions: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """The dense weight of a packed sparse op: ``values`` scattered at fixed flat ``positions``."""
    flat = values.new_zeros(out_f * in_f).index_put((positions,), values.reshape(-1))
    return flat.view(out_f, in_f)


def _is_sparse_op(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "namespace", None) == "sparsecomp" and \
        any(s in str(n.target) for s in _SPARSE_OPS)


def _get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sparse_positions(gm: fx.GraphModule, n: fx.Node) -> tuple[torch.Tensor, int, int, fx.Node, fx.Node, Any]:
    """Flat positions of every packed value of a ``sparse_linear_*`` node, from the format's own ``to_dense``."""
    from ..ops import BSRWeight, CSRWeight, NMWeight

    op = str(n.target)
    t = lambda a: _get_tensor(gm, a.target)  # noqa: E731
    if "csr" in op:
        x, crow, col, values, bias, out_f, in_f = n.args[:7]
        vt = t(values)
        ramp = CSRWeight(t(crow), t(col), torch.arange(1, vt.numel() + 1, dtype=torch.float64), (out_f, in_f))
    elif "bsr" in op:
        x, crow, col, values, bias, out_f, in_f, r, c = n.args[:9]
        vt = t(values)
        ramp = BSRWeight(t(crow), t(col), torch.arange(1, vt.numel() + 1, dtype=torch.float64).view(vt.shape),
                         (out_f, in_f), (r, c))
    else:
        x, values, indices, bias, nn_, m, in_f = n.args[:7]
        vt = t(values)
        out_f = vt.shape[0]
        ramp = NMWeight(torch.arange(1, vt.numel() + 1, dtype=torch.float64).view(vt.shape), t(indices), nn_, m,
                        (out_f, in_f))
    dense = ramp.to_dense().reshape(-1)
    nz = torch.nonzero(dense).squeeze(1)
    positions = torch.empty(vt.numel(), dtype=torch.long)
    positions[dense[nz].long() - 1] = nz
    return positions, int(out_f), int(in_f), x, values, bias


def training_module(gm: fx.GraphModule, outputs: list[fx.Node], cut: fx.Node | None = None) -> fx.GraphModule:
    """A differentiable copy of ``gm``'s graph (sharing ``gm``'s tensors) that takes the flat inputs (plus the
    value of ``cut`` when given, which then replaces that node) and returns ``outputs`` as a tuple.

    ``sparse_linear_*`` nodes become ``linear(x, _densify(values, positions))``; ``positions`` are
    registered on ``gm`` as ``_recover_pos_*`` buffers (see :func:`_drop_positions`).
    """
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
    if cut is not None:
        env[cut] = g.placeholder("cut_input")
    for n in gm.graph.nodes:
        if n in env or n.op == "output" or (n.op == "call_module" and not n.users):
            continue
        if _is_sparse_op(n):
            positions, out_f, in_f, x, values, bias = _sparse_positions(gm, n)
            name = f"_recover_pos_{n.name}"
            if not hasattr(gm, name):
                gm.register_buffer(name, positions, persistent=False)
            w = g.call_function(_densify, (env[values] if values in env else g.get_attr(values.target),
                                           g.get_attr(name), out_f, in_f))
            env[n] = g.call_function(torch.ops.aten.linear.default,
                                     (env[x], w, env[bias] if bias is not None else None))
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    g.eliminate_dead_code()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fx.GraphModule(gm, g)


def _drop_positions(gm: fx.GraphModule) -> None:
    for name in [b for b, _ in gm.named_buffers() if b.startswith("_recover_pos_")]:
        delattr(gm, name)


def _flat_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    return leaves


# ------------------------------------------------------------------------------------------------ trainable tensors
@dataclasses.dataclass
class _Tensor:
    name: str
    tensor: torch.Tensor
    zeros: torch.Tensor | None  # mask of entries that must stay exactly zero


def trainable_tensors(gm: fx.GraphModule, train_embeddings: bool) -> dict[str, _Tensor]:
    """Float parameters (minus embedding tables) and the ``values`` of packed sparse ops, by target name."""
    frozen = set()
    values = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is _EMBEDDING and not train_embeddings:
            if isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
                frozen.add(n.args[0].target)
        if _is_sparse_op(n):
            v = n.args[1] if "nm" in str(n.target) else n.args[3]
            values.add(v.target)
    names = {name for name, p in gm.named_parameters() if p.is_floating_point()} | values
    out = {}
    for name in sorted(names - frozen):
        t = _get_tensor(gm, name)
        zeros = None
        if t.dim() >= 2 or name in values:
            z = t.detach() == 0
            zeros = z if bool(z.any()) else None
        out[name] = _Tensor(name, t, zeros)
    return out


def _used_tensors(module: fx.GraphModule, tensors: dict[str, _Tensor]) -> list[_Tensor]:
    return [tensors[n.target] for n in module.graph.nodes if n.op == "get_attr" and n.target in tensors]


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
            if self.stale >= self.cfg.patience:
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


# ------------------------------------------------------------------------------------------------ the pass
@register_pass(Recover, context=True)
def run_recover(captured: Captured, cfg: Recover, calibration: Any = None,
                context: PassContext | None = None) -> PassResult:
    """Distil ``captured`` (compressed) from ``context.original`` (the graph before the first pass)."""
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    if context is None or context.original is None:
        raise PassError(_NAME, "needs the original captured graph as teacher: run it inside compress([...])")
    if calibration is None:
        raise PassError(_NAME, "needs calibration data (the teacher labels it)")
    teacher_gm = context.original.module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(captured.module)
    deadline = None if cfg.budget_s is None else t_start + cfg.budget_s

    data = _prepare_data(gm, calibration, captured, cfg)
    rng = random.Random(cfg.seed)
    order = list(range(len(data.samples)))
    rng.shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(order)))
    if len(order) - n_val < 1:
        raise PassError(_NAME, f"{len(order)} calibration samples cannot be split for validation")
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])

    blocks, why_no_blocks = corresponding_blocks(gm, teacher_gm)
    s_out, t_out = module_outputs(gm), module_outputs(teacher_gm)
    s_final, t_final = _flat_outputs(gm), _flat_outputs(teacher_gm)
    finals = set(s_final)
    points = [p for p in blocks if s_out[p] not in finals]
    student_e2e = training_module(gm, [*s_final, *(s_out[p] for p in points)])
    teacher_all = training_module(teacher_gm, [*t_final, *(t_out[p] for p in blocks)])
    float_out = [i for i, n in enumerate(s_final) if isinstance(n.meta.get("val"), torch.Tensor)
                 and n.meta["val"].is_floating_point()]
    tensors = trainable_tensors(gm, cfg.train_embeddings)
    mask_of = lambda flat: flat[data.mask_index] if data.mask_index is not None else None  # noqa: E731

    # teacher values: outputs of every sample (validation) and block outputs (block phase), computed once
    def teacher_run(flat: list[Any]) -> tuple:
        with torch.no_grad():
            return teacher_all(*flat)

    val_batches = [sorted(val_idx, key=lambda i: data.samples[i][data.mask_index].shape[1] if data.dynamic_seq else 0)]
    val_batches = [val_batches[0][k:k + cfg.batch_size] for k in range(0, len(val_idx), cfg.batch_size)]
    val_cache = []
    for b in val_batches:
        flat = _collate(data, [data.samples[i] for i in b])
        val_cache.append((flat, [teacher_run(flat)[i] for i in float_out]))
    student_out = training_module(gm, s_final)

    def validate() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for flat, targets in val_cache:
                got = student_out(*flat)
                n = flat[0].shape[0] if isinstance(flat[0], torch.Tensor) else 1
                loss = sum(float(output_loss(cfg.output_loss, got[i], t, mask_of(flat)))
                           for i, t in zip(float_out, targets))
                total, count = total + loss * n, count + n
        return total / max(count, 1)

    best = _Best(tensors, validate())
    cache: dict[int, list[torch.Tensor]] = {}  # teacher outputs and block outputs per training sample

    def fill_cache() -> None:
        todo = [i for i in train_idx if i not in cache]
        for b in _batches(data, todo, cfg.batch_size, random.Random(0)):
            flat = _collate(data, [data.samples[i] for i in b])
            vals = teacher_run(flat)
            for r, i in enumerate(b):
                length = data.samples[i][data.mask_index].shape[1] if data.dynamic_seq else None
                cache[i] = [_trim(v[r:r + 1], length, mask_of(flat)) for v in vals]
    report: list[dict[str, Any]] = [{"phase": "start", "val_loss": best.score, "blocks": blocks,
                                     "block_reason": why_no_blocks or None,
                                     "train_samples": len(train_idx), "val_samples": len(val_idx)}]
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    share = (cfg.block_epochs * 0.6, cfg.epochs)  # a block epoch costs about 0.6 e2e epoch (no online teacher)

    def phase_deadline(k: int) -> float | None:
        if deadline is None:
            return None
        now = time.perf_counter()
        left = deadline - now
        rest = sum(share[k:]) or 1
        return now + left * share[k] / rest

    # ---- block-wise phase
    if cfg.block_epochs > 0 and blocks:
        t0, c0 = time.perf_counter(), time.process_time()
        fill_cache()
        ph_deadline = phase_deadline(0)
        per_block = cfg.block_epochs * steps_per_epoch
        block_steps = []
        for k, path in enumerate(blocks):
            cut = s_out[blocks[k - 1]] if k > 0 else None
            module = training_module(gm, [s_out[path]], cut=cut)
            used = [t for t in _used_tensors(module, tensors)
                    if t.name in {a.target for n in _scope_nodes(gm, path) for a in n.all_input_nodes if a.op == "get_attr"}]
            if not used:
                continue
            blk_deadline = None if ph_deadline is None else \
                time.perf_counter() + (ph_deadline - time.perf_counter()) / (len(blocks) - k)
            trainer = _Trainer(cfg, used, cfg.block_lr or cfg.lr, int(per_block), blk_deadline,
                               lambda: 0.0, best, f"block {path}")
            trainer.eval_every = 0
            brng = random.Random(cfg.seed * 1000 + k)
            bar = progress_bar(range(int(per_block)), f"recover {path}", cfg.progress)
            it = iter(bar)
            while not trainer.done():
                for b in _batches(data, train_idx, cfg.batch_size, brng):
                    if trainer.done():
                        break
                    flat = _collate(data, [data.samples[i] for i in b])
                    seq_len = flat[data.mask_index].shape[1] if data.dynamic_seq else None
                    nf = len(t_final)
                    target = _collate_acts([cache[i][nf + k] for i in b], seq_len)
                    args = [*flat] if cut is None else \
                        [*flat, _collate_acts([cache[i][nf + k - 1] for i in b], seq_len)]
                    (got,) = module(*args)
                    trainer.step(relative_mse(got, target, mask_of(flat)))
                    next(it, None)
            trainer.close()
            block_steps.append(trainer.step_count)
        score = validate()
        improved = best.offer(score, "block-wise")
        report.append({"phase": "block-wise", "val_loss": score, "kept": improved, "blocks": len(blocks),
                       "steps_per_block": block_steps, "seconds": time.perf_counter() - t0,
                       "cpu_seconds": time.process_time() - c0})
        if not improved:
            best.restore()
    elif cfg.block_epochs > 0:
        report.append({"phase": "block-wise", "skipped": why_no_blocks})

    # ---- end-to-end phase
    if cfg.epochs > 0:
        t0, c0 = time.perf_counter(), time.process_time()
        total = int(cfg.epochs * steps_per_epoch)
        used = _used_tensors(student_e2e, tensors)
        trainer = _Trainer(cfg, used, cfg.lr, total, phase_deadline(1), validate, best, "end-to-end")
        if not trainer.eval_every:
            trainer.eval_every = max(1, steps_per_epoch // 2)
        erng = random.Random(cfg.seed + 7919)
        augment = cfg.augment if data.mask_index is not None and data.dynamic_seq else ()
        vocab = None
        if "substitute" in augment and data.id_input is not None:
            vocab = torch.cat([data.samples[i][data.id_input][0, 1:-1] for i in train_idx])
        fill_cache()
        bar = iter(progress_bar(range(total), "recover end-to-end", cfg.progress))
        n_points = len(points)
        while not trainer.done():
            for b in _batches(data, train_idx, cfg.batch_size, erng):
                if trainer.done():
                    break
                samples = [data.samples[i] for i in b]
                if augment and erng.random() < 0.5:  # an augmented batch, labelled by the teacher now
                    samples = [_augment(data, s, data.samples[train_idx[erng.randrange(len(train_idx))]],
                                        erng.choice(augment), erng, vocab) for s in samples]
                    flat = _collate(data, samples)
                    with torch.no_grad():
                        tvals = teacher_all(*flat)
                else:
                    flat = _collate(data, samples)
                    seq_len = flat[data.mask_index].shape[1] if data.dynamic_seq else None
                    tvals = [_collate_acts([cache[i][j] for i in b], seq_len) for j in range(len(cache[b[0]]))]
                mask = mask_of(flat)
                t_points = [tvals[len(t_final) + blocks.index(p)] for p in points]
                got = student_e2e(*flat)
                loss = sum(output_loss(cfg.output_loss, got[i], tvals[i], mask) for i in float_out)
                if n_points and cfg.intermediate_weight > 0:
                    inter = sum(relative_mse(got[len(s_final) + j], t_points[j], mask) for j in range(n_points))
                    loss = loss + cfg.intermediate_weight * inter / n_points
                trainer.step(loss)
                next(bar, None)
        last = trainer.check()
        trainer.close()
        report.append({"phase": "end-to-end", "val_loss": last, "best_val_loss": best.score, "steps": trainer.step_count,
                       "early_stopped": trainer.stopped and trainer.progress() < 1.0,
                       "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})

    best.restore()
    _drop_positions(gm)
    kept_start = best.label == "start"
    report.append({"phase": "result", "val_loss_start": best.history[0][1], "val_loss": best.score,
                   "kept": "the starting weights (no phase beat them on validation)" if kept_start else best.label,
                   "seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - cpu_start})
    if kept_start:
        return PassResult(captured, False, report, _NAME)
    gm.recompile()
    return PassResult(captured.recapture(gm), True, report, _NAME)
