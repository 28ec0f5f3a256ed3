"""The Recover pass: the block-wise phase, then the end-to-end phase, each kept only if validation improves."""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from typing import Any

import torch

from ...calibration.data import progress_bar
from ...capture.export import Captured
from ...errors import PassError
from ..base import PassContext, PassResult, register_pass
from .config import _NAME, BLOCK_SHARE, Recover
from .data import _augment, _batches, _collate, _collate_acts, _prepare_data, _trim, output_loss, relative_mse
from .graphs import (_drop_positions, _flat_outputs, _scope_nodes, _used_tensors, corresponding_blocks,
                     module_outputs, trainable_tensors, training_module)
from .train import _Best, _Trainer

#: The step bound of a phase that only the clock ends (``epochs=None`` with a budget).
_UNBOUNDED = 1 << 40


class _PercentBar:
    """Progress of a phase in percent of its bound (steps or time, whichever is nearer its end)."""

    def __init__(self, trainer: _Trainer, desc: str, enabled: bool) -> None:
        self.trainer, self.shown = trainer, 0
        self.bar = progress_bar(None, desc, enabled, total=100)

    def update(self) -> None:
        now = int(100 * self.trainer.progress())
        if now > self.shown:
            self.bar.update(now - self.shown)
            self.shown = now

    def close(self) -> None:
        self.bar.close()


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
    e2e_epochs = cfg.e2e_epochs  # None: until the budget is spent
    if e2e_epochs is None:
        share = (BLOCK_SHARE if cfg.block_epochs > 0 and blocks else 0.0, 1.0 - BLOCK_SHARE)
    else:
        share = (cfg.block_epochs * 0.6, e2e_epochs)  # a block epoch costs about 0.6 e2e epoch (no online teacher)

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
    if e2e_epochs is None or e2e_epochs > 0:
        t0, c0 = time.perf_counter(), time.process_time()
        total = _UNBOUNDED if e2e_epochs is None else int(e2e_epochs * steps_per_epoch)
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
        bar = _PercentBar(trainer, "recover end-to-end (%)", cfg.progress)
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
                bar.update()
        bar.close()
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
