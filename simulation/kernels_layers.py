"""Per-layer neighbour sums with learnable layer weights: Σ_l w_l · (A_l x).

The default engine path sums over one merged CSR whose weights bake the layer weights in
(``ContactGraph.merged()``, bit-packed when they are all 1). When a calibration wants to
*learn* the layer weights (household, school, work, community, …), the engine instead keeps
the layers apart and combines them with torch scalars:

    y_i = Σ_l w_l Σ_{j ∈ N_l(i)} a^l_ij x_j

Gradients: ∂L/∂x = Σ_l w_l A_l g (every layer is symmetric) and ∂L/∂w_l = ⟨x, A_l g⟩, both
from the same per-layer sums of the incoming gradient g, so only x is kept for the backward
(n floats a day, as in the merged path), never the per-layer sums. Forward-mode tangents
(jvp) are Σ_l w_l A_l ẋ + Σ_l ẇ_l A_l x. On CPU the infected flags are bit-packed once a
day, and one pass over a copy of the layers with agent i's contacts of every layer in one row,
each edge tagged with its layer (:func:`stack_layers`, cached on the graph), applies
Σ_l w_l A_l at the memory traffic of the merged CSR plus a byte per edge (numba); ∂L/∂w_l
comes from one chunked pass. On CUDA each layer is a torch sparse CSR matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import numba
import numpy as np
import torch
from torch import nn

from simulation.kernels import _pack_binary
from simulation.numba_threads import follow_torch_threads
from simulation.population import ContactGraph, CSRLayer

__all__ = ["LayeredNeighbourSum", "layer_weight_parameters"]


@numba.njit(parallel=True, cache=True)
def _stack_fill(indptrs, indices, out_ptr, out_idx, out_lid, weights, out_w, has_w):  # pragma: no cover
    """Row-interleave L CSRs (stacked; layer l's arrays start at indptrs[l, 0]): row i holds
    layer 0's contacts, then layer 1's, …, each edge tagged with its layer."""
    for i in numba.prange(indptrs.shape[1] - 1):
        o = out_ptr[i]
        for layer in range(indptrs.shape[0]):
            a = indptrs[layer, i]
            for k in range(indptrs[layer, i + 1] - a):
                out_idx[o] = indices[a + k]
                out_lid[o] = layer
                if has_w:
                    out_w[o] = weights[a + k]
                o += 1


@numba.njit(parallel=True, fastmath=True, cache=True)
def _fwd_bits(indptr, indices, lid, wtab, ew, has_ew, bits, out):  # pragma: no cover - compiled
    """out_i = Σ_k wtab[layer_k] (ew_k) · 1[x_{j_k} = 1] with x bit-packed (branch-free in the layer)."""
    for i in numba.prange(indptr.size - 1):
        acc = np.float32(0.0)
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            b = np.float32((bits[j >> 6] >> np.uint64(j & 63)) & np.uint64(1))
            v = wtab[lid[k]] * b
            acc += v * ew[k] if has_ew else v
        out[i] = acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def _fwd_float(indptr, indices, lid, wtab, ew, has_ew, x, out):  # pragma: no cover - compiled
    """out_i = Σ_k wtab[layer_k] (ew_k) x_{j_k}."""
    for i in numba.prange(indptr.size - 1):
        acc = np.float32(0.0)
        for k in range(indptr[i], indptr[i + 1]):
            v = wtab[lid[k]] * x[indices[k]]
            acc += v * ew[k] if has_ew else v
        out[i] = acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def _layer_dots(indptr, indices, lid, ew, has_ew, x, g, n_layers, chunk, partial):  # pragma: no cover
    """partial[c, l] = Σ over rows i of chunk c of x_i Σ_{k ∈ row i, layer l} (ew_k) g_{j_k};
    summed over chunks this is ⟨x, A_l g⟩ (= ∂L/∂w_l for upstream gradient g)."""
    n = indptr.size - 1
    for c in numba.prange(partial.shape[0]):
        row = np.zeros(n_layers, np.float64)
        tot = np.zeros(n_layers, np.float64)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            xi = x[i]
            if xi == 0.0:
                continue
            for k in range(indptr[i], indptr[i + 1]):
                v = g[indices[k]]
                row[lid[k]] += v * ew[k] if has_ew else v
            for layer in range(n_layers):
                tot[layer] += xi * row[layer]
                row[layer] = 0.0
        for layer in range(n_layers):
            partial[c, layer] = tot[layer]


def stack_layers(layers: list[CSRLayer]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(indptr int64, indices int32, layer int8, weights float32 | None): every layer's
    contacts of agent i stored together in one row, each edge tagged with its layer, so one
    pass over the rows applies Σ_l w_l A_l with the memory traffic of the merged CSR (plus
    one byte per edge) and no per-layer branching."""
    n, n_layers = layers[0].n, len(layers)
    if n_layers > 127:
        raise ValueError("at most 127 layers")
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(sum(layer.degree().numpy().astype(np.int64) for layer in layers), out=indptr[1:])
    offsets = np.cumsum([0] + [layer.nnz for layer in layers])
    indptrs = np.stack([layer.indptr.numpy() + off for layer, off in zip(layers, offsets[:-1], strict=True)])
    indices = np.concatenate([layer.indices.numpy() for layer in layers])
    has_w = any(layer.weights is not None for layer in layers)
    weights = (np.concatenate([np.ones(layer.nnz, np.float32) if layer.weights is None else layer.weights.numpy()
                               for layer in layers]) if has_w else np.empty(0, np.float32))
    out_idx = np.empty(int(indptr[-1]), np.int32)
    out_lid = np.empty(out_idx.size, np.int8)
    out_w = np.empty(out_idx.size if has_w else 0, np.float32)
    _stack_fill(indptrs, indices, indptr, out_idx, out_lid, weights, out_w, has_w)
    return indptr, out_idx, out_lid, (out_w if has_w else None)


def layer_weight_parameters(graph: ContactGraph, learn: list[str] | tuple[str, ...] | None = None) -> nn.ParameterDict:
    """``nn.ParameterDict`` of layer weights initialised from ``graph.layer_weights`` (1 where
    unset), for the layers in ``learn`` (default: every layer). Assign it to
    ``model.layer_weights`` (or pass it to ``simulate(layer_weights=...)``); layers left out
    keep their baked weight as a constant."""
    names = list(graph.layers) if learn is None else list(learn)
    unknown = [k for k in names if k not in graph.layers]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; the graph has {list(graph.layers)}")
    return nn.ParameterDict(
        {k: nn.Parameter(torch.tensor(float(graph.layer_weights.get(k, 1.0)))) for k in names})


def _stacked(graph: ContactGraph, names: list[str]):
    """stack_layers of the graph, cached on it (keyed by the layer objects)."""
    key = tuple((k, id(graph.layers[k])) for k in names)
    cache = graph.__dict__.get("_stacked_layers")
    if cache is None or cache[0] != key:
        cache = (key, stack_layers([graph.layers[k].to("cpu") for k in names]))
        graph.__dict__["_stacked_layers"] = cache
    return cache[1]


_CHUNK = 4096


class LayeredNeighbourSum:
    """x ↦ Σ_l w_l A_l x over the layers of a graph; ``weights`` maps layer name → scalar
    tensor (learnable); layers not in it use the graph's baked float weight. ``sparse``
    forces the torch sparse path (default on CUDA; on CPU only to test it)."""

    def __init__(self, graph: ContactGraph, weights: Mapping[str, torch.Tensor],
                 device: torch.device | str = "cpu", sparse: bool | None = None) -> None:
        unknown = [k for k in weights if k not in graph.layers]
        if unknown:
            raise ValueError(f"layer weights for unknown layers {unknown}; the graph has {list(graph.layers)}")
        self.device = torch.device(device)
        self.names = list(graph.layers)
        self.n = graph.n
        self.weights = weights
        self.fixed = {k: float(graph.layer_weights.get(k, 1.0)) for k in self.names}
        self.indptr, self.indices, self.lid, ew = _stacked(graph, self.names)
        self.has_ew = ew is not None
        self.ew = ew if ew is not None else np.empty(0, np.float32)
        self._bits = np.empty((self.n + 63) // 64, dtype=np.uint64)
        self._sparse: list[torch.Tensor] | None = None
        if sparse if sparse is not None else self.device.type != "cpu":  # torch sparse CSR (CUDA)
            self._sparse = [
                torch.sparse_csr_tensor(
                    layer.indptr, layer.indices.to(torch.int64),
                    layer.weights if layer.weights is not None else torch.ones(layer.nnz),
                    (layer.n, layer.n)).to(self.device)
                for layer in (graph.layers[k] for k in self.names)]

    def weight_vector(self) -> torch.Tensor:
        """[L] tensor of the current layer weights (differentiable where learnable)."""
        ws = [self.weights[k].reshape(()) if k in self.weights
              else torch.tensor(self.fixed[k]) for k in self.names]
        return torch.stack([w.to(self.device, torch.float32) for w in ws])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_l w_l A_l x for every agent; gradients flow to ``x`` and to the layer weights."""
        if x.shape != (self.n,):
            raise ValueError(f"expected a vector of {self.n} agents, got {tuple(x.shape)}")
        return _LayeredSumFn.apply(x, self.weight_vector(), self)

    def apply(self, x: torch.Tensor, w: torch.Tensor, binary_ok: bool = False) -> torch.Tensor:
        """Σ_l w_l A_l x (no autograd); ``w`` is a [L] tensor."""
        if self._sparse is not None:
            out = torch.zeros_like(x)
            for wl, a in zip(w.unbind(0), self._sparse, strict=True):
                out = out + wl * (a.to(x.dtype) @ x.unsqueeze(1)).squeeze(1)
            return out
        xc = x.detach().contiguous()
        out = torch.empty_like(xc)
        wtab = w.detach().cpu().numpy().astype(np.float32)
        threads = follow_torch_threads()
        # 0/1 inputs (infection flags) are bit-packed, as in the merged path
        if binary_ok and _pack_binary(xc.numpy(), self._bits):
            _fwd_bits(self.indptr, self.indices, self.lid, wtab, self.ew, self.has_ew, self._bits, out.numpy())
        else:
            _fwd_float(self.indptr, self.indices, self.lid, wtab, self.ew, self.has_ew, xc.numpy(), out.numpy())
        torch.set_num_threads(threads)
        return out

    def layer_dots(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[L]: ⟨x, A_l g⟩ for every layer (no autograd)."""
        if self._sparse is not None:
            return torch.stack([torch.dot(x, (a.to(g.dtype) @ g.unsqueeze(1)).squeeze(1)) for a in self._sparse])
        xc, gc = x.detach().contiguous(), g.detach().contiguous()
        partial = np.zeros(((self.n + _CHUNK - 1) // _CHUNK, len(self.names)), np.float64)
        threads = follow_torch_threads()
        _layer_dots(self.indptr, self.indices, self.lid, self.ew, self.has_ew, xc.numpy(), gc.numpy(),
                    len(self.names), _CHUNK, partial)
        torch.set_num_threads(threads)
        return torch.from_numpy(partial.sum(0)).to(g.dtype)


class _LayeredSumFn(torch.autograd.Function):
    """y = Σ_l w_l A_l x, bilinear in (x, w): backward ∂x = Σ_l w_l A_l g (symmetric layers),
    ∂w_l = ⟨x, A_l g⟩; forward-mode ẏ = Σ_l w_l A_l ẋ + Σ_l ẇ_l A_l x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, op: LayeredNeighbourSum) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        return op.apply(x, w, binary_ok=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = grad.contiguous()
        gx = ctx.op.apply(g, w) if ctx.needs_input_grad[0] else None
        gw = ctx.op.layer_dots(x, g) if ctx.needs_input_grad[1] else None
        return gx, gw, None

    @staticmethod
    def jvp(ctx, tx: torch.Tensor | None, tw: torch.Tensor | None, _op):  # type: ignore[override]
        x, w = ctx.saved_tensors
        out = torch.zeros_like(x)
        if tx is not None:
            out = out + ctx.op.apply(tx.contiguous(), w)
        if tw is not None:
            out = out + ctx.op.apply(x, tw)
        return out
