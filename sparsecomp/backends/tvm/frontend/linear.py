"""Converters of ``linear`` / ``addmm`` / ``mm`` / ``bmm`` and of the ``sparsecomp::sparse_linear_*`` ops."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

import tvm
from tvm import relax

from .. import kernels


class LinearConverters:
    """Dense and sparse matrix products -> the dense, BSR, CSR, N:M and bmm kernels (a mixin of ``_Lowering``)."""

    def linear(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        w = self.const(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else None
        if (
            w is None
            or w.dim() != 2
            or w.dtype != torch.float32
            or x.ty.dtype != "float32"
            or x.ty.ndim < 2  # a 1-D input has no rows to tile over
            or (bias_arg is not None and self.const(bias_arg) is None)
        ):
            return type(imp)._linear(imp, node)  # the importer's own lowering
        bias = None if bias_arg is None else self.const(bias_arg)
        return self._dense(imp, node, x, w, bias)

    def _dense(self, imp, node, x, w: torch.Tensor, bias: torch.Tensor | None) -> relax.Var:
        """``x @ w.T + bias`` through the packed dense kernel (``w`` constant ``[N, K]``)."""
        n_out, k = w.shape
        nb = kernels.DENSE_NB
        padded = -(-n_out // nb) * nb
        wp = torch.zeros(padded, k)
        wp[:n_out] = w.detach()
        packed = wp.reshape(padded // nb, nb, k).permute(0, 2, 1).contiguous().numpy()
        b = np.zeros(padded, np.float32)
        if bias is not None:
            b[:n_out] = bias.detach().float().numpy()
        self._count("dense")
        return self._emit(imp, node, x, k, n_out, padded, kernels.dense_kernel(k, padded, self.dense_mb, parallel=self.parallel),
                          f"sc_dense_{k}x{padded}", [relax.const(packed), relax.const(b)], False)

    def addmm(self, node: fx.Node, imp) -> relax.Var:
        """``addmm(bias, x, W)`` / ``mm(x, W)`` with a constant ``W [K, N]`` (HF ``Conv1D``)."""
        is_mm = node.target is torch.ops.aten.mm.default
        bias_arg, x_arg, w_arg = (None, *node.args[:2]) if is_mm else node.args[:3]
        x = imp.env[x_arg]
        w = self.const(w_arg)
        bias = None if bias_arg is None else self.const(bias_arg)
        plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
        if (
            w is None or w.dim() != 2 or w.dtype != torch.float32 or x.ty.dtype != "float32"
            or x.ty.ndim != 2 or not plain
            or (bias_arg is not None and (bias is None or bias.shape != (w.shape[1],)))
        ):
            if is_mm:
                return imp.block_builder.emit(relax.op.matmul(x, imp.env[w_arg]))
            return type(imp)._addmm(imp, node)  # the importer's own lowering
        return self._dense(imp, node, x, w.t(), bias)

    def _compressed_rows(self, node: fx.Node, imp) -> tuple[relax.Expr, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float32 input and the constant ``(crow_indices, col_indices, values)`` of a CSR/BSR op."""
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        return (x, self.need_const(node, 1, "crow_indices"), self.need_const(node, 2, "col_indices"),
                self.need_const(node, 3, "values").float())

    def sparse_bsr(self, node: fx.Node, imp) -> relax.Var:
        x, crow, col, values = self._compressed_rows(node, imp)
        n_out, k, r, c = (int(a) for a in node.args[5:9])
        nnzb = values.shape[0]
        if nnzb == 0:
            values = torch.zeros(1, r, c)  # keep buffers non-empty; crow bounds every loop to 0 trips
            col = torch.zeros(1, dtype=torch.int32)
        kernel = kernels.bsr_kernel(n_out, k, r, c, values.shape[0], "int32", parallel=self.parallel,
                                    pf=self.prefetch.bsr(r, c))
        stored = kernels.bsr_stored(col.numpy(), values.numpy(), r, c)
        self._count(f"bsr{r}x{c}")
        consts = [self._index(crow), *(relax.const(a) for a in stored), self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, f"sc_bsr{r}x{c}_{n_out}x{k}",
                          consts, False)

    def sparse_csr(self, node: fx.Node, imp) -> relax.Var:
        x, crow, col, values = self._compressed_rows(node, imp)
        n_out, k = int(node.args[5]), int(node.args[6])
        # columns < in_features: int16 when they fit (6 instead of 8 bytes streamed per nonzero)
        narrow = k <= np.iinfo(np.int16).max
        sptr, cols, vals, perm = kernels.sell_layout(
            crow.numpy(), col.numpy().astype(np.int16 if narrow else np.int32), values.numpy())
        kernel = kernels.csr_kernel(n_out, k, len(sptr) - 1, cols.shape[0], "int16" if narrow else "int32",
                                    parallel=self.parallel, bmi=self.bmi, pf=self.prefetch.csr)
        self._count("csr")
        name = f"sc_csr_{n_out}x{k}"
        consts = [relax.const(sptr), relax.const(cols), relax.const(vals), relax.const(perm),
                  self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def sparse_nm(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        values = self.need_const(node, 1, "values").float()
        positions = self.need_const(node, 2, "indices")
        n, m, k = int(node.args[4]), int(node.args[5]), int(node.args[6])
        n_out = values.shape[0]
        self._count(f"nm{n}:{m}")
        name = f"sc_nm{n}_{m}_{n_out}x{k}"
        if kernels.nm_lanes_supported(n_out, k, n, m, self.avx2):
            vals, pos = kernels.nm_lane_layout(values.numpy(), positions.numpy())
            padded = vals.shape[0] * kernels.SELL_R
            kernel = kernels.nm_lanes_kernel(n_out, k, n, m, parallel=self.parallel, pf=self.prefetch.nm)
            consts = [relax.const(vals), relax.const(pos), self._bias(node, 3, n_out, padded)]
            return self._emit(imp, node, x, k, n_out, padded, kernel, name + "_lanes", consts, False)
        pos = positions.to(torch.uint8) if positions.numel() == 0 or int(positions.max()) < 256 else positions.to(torch.int32)
        kernel = kernels.nm_kernel(n_out, k, n, m, "uint8" if pos.dtype == torch.uint8 else "int32",
                                   parallel=self.parallel)
        consts = [relax.const(values.contiguous().numpy()), relax.const(pos.contiguous().numpy()),
                  self._bias(node, 3, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def bmm(self, node: fx.Node, imp) -> relax.Var:
        """``aten.bmm`` with static ``M, K, N`` -> :func:`.kernels.bmm_kernel`."""
        a, b = imp.env[node.args[0]], imp.env[node.args[1]]
        sa, sb = a.ty.shape.values, b.ty.shape.values
        dims = [sa[1], sa[2], sb[2]]
        if (
            a.ty.dtype != "float32" or b.ty.dtype != "float32"
            or not all(isinstance(d, tvm.tirx.IntImm) for d in dims)
        ):
            return imp.block_builder.emit(relax.op.matmul(a, b))
        m, k, n = (int(d) for d in dims)
        self._count("bmm")
        gv = imp.block_builder.add_func(kernels.bmm_kernel(m, k, n, parallel=self.parallel), f"sc_bmm_{m}x{k}x{n}")
        return imp.block_builder.emit(
            relax.call_tir(gv, [a, b], relax.TensorType([sa[0], m, n], "float32"))
        )
