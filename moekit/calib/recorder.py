"""On-device accumulators of routing statistics, one per MoE layer and calibration domain.

Everything is summed in int64 / float64 tensors on the layer's own device; nothing is read back
until `finish()`, so recording adds no host-device synchronisation to the forward pass.
Each batch's routing (ids, weights, norms [T, k]) is queued as it comes and summed in one go
every QUEUE_SLOTS routed slots (and at `flush()` / `finish()`): on CUDA the cost of recording
is the number of small kernels launched per layer and batch, not their arithmetic.

Per layer l, domain d and expert e (T tokens, slots (t, s) with id[t, s] = e, weight w[t, s],
expert output f_e(x_t), unweighted):

    tokens[d, e]     = #{(t, s): id[t, s] = e}                 routed slots
    weight_sum[d, e] = sum w[t, s]                              routing weight as applied
    ean_sum[d, e]    = sum ||f_e(x_t)||_2                       expert activation norm (EAN)
    reap_sum[d, e]   = sum w[t, s] * ||f_e(x_t)||_2             REAP numerator
    max_norm[d, e]   = max ||f_e(x_t)||_2
    coact[d, i, j]   = #{t: i and j both among token t's k experts}   (diagonal = tokens)
    entropy_sum[d]   = sum_t H(p_t),  p_t the router's full distribution over E experts
    top1_repeats[d]  = #{consecutive token pairs of a window with the same top-1 expert}

Per calibration window (one row of a [B, S] batch; the whole batch when the hook sees no
[B, S] shape), kept apart for bootstrap intervals (moekit.stats.uncertainty), W_d windows:

    window_tokens[d] [W_d, E] int32    routed slots of each expert in each window
    window_reap[d]   [W_d, E] float32  REAP numerator of each expert in each window
    window_weight[d] [W_d, E] float32  gate-weight sum of each expert in each window
    window_ean[d]    [W_d, E] float32  output-norm sum (EAN) of each expert in each window
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

Scoring = str  # "softmax" | "sigmoid"
QUEUE_SLOTS = 1 << 16  # routed slots queued per layer before they are summed (<= 1 MB)


@dataclass
class LayerRaw:
    """Host copies of one layer's sums; arrays are [D, E] (coact [D, E, E]) or [D]."""

    layer: int
    num_experts: int
    tokens: np.ndarray
    weight_sum: np.ndarray
    ean_sum: np.ndarray
    reap_sum: np.ndarray
    max_norm: np.ndarray
    coact: np.ndarray
    positions: np.ndarray
    entropy_sum: np.ndarray
    top1_pairs: np.ndarray
    top1_repeats: np.ndarray
    trace: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    window_tokens: list[np.ndarray] = field(default_factory=list)  # per domain [W_d, E] int32
    window_reap: list[np.ndarray] = field(default_factory=list)  # per domain [W_d, E] float32
    window_weight: list[np.ndarray] = field(default_factory=list)  # per domain [W_d, E] float32
    window_ean: list[np.ndarray] = field(default_factory=list)  # per domain [W_d, E] float32


@dataclass
class _Queued:
    """One batch's routing, kept until the next flush: [T, k] each, `rows` windows."""

    ids: torch.Tensor
    weights: torch.Tensor
    norms: torch.Tensor
    contributions: torch.Tensor | None
    rows: int


class LayerAccumulator:
    """The running sums of one MoE layer (see the module docstring for the formulas).

    Kept for few kernel launches per batch: a batch costs its top-1 repeat count and its
    entropy; its routing is queued, and a flush sums every queued slot at once - tokens,
    weight, EAN and REAP in one float64 `index_add_` into `sums` [D, E, 4] (counts exact in
    float64 below 2^53), the per-window counts and REAP sums in one float32 `index_add_`
    (counts exact below 2^24 slots per window). The slots are added in batch order, so every
    value equals that of summing batch by batch (bit for bit on the CPU)."""

    def __init__(self, layer: int, num_experts: int, num_domains: int, device: Any,
                 trace: bool = False):
        import torch

        self.layer, self.num_experts, self.trace = layer, num_experts, trace
        shape = (num_domains, num_experts)
        i64 = dict(dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        self.sums = torch.zeros((*shape, 4), **f64)  # tokens, weight_sum, ean_sum, reap_sum
        self.max_norm = torch.zeros(shape, **f64)
        self.coact = torch.zeros((num_domains, num_experts * num_experts), **i64)
        self.entropy_sum = torch.zeros(num_domains, **f64)
        self.top1_repeats = torch.zeros(num_domains, **i64)
        self.positions = [0] * num_domains
        self.top1_pairs = [0] * num_domains
        self.trace_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            [] for _ in range(num_domains)]
        self.window_parts: list[list[tuple[torch.Tensor, ...]]] = [
            [] for _ in range(num_domains)]
        self.queue: list[list[_Queued]] = [[] for _ in range(num_domains)]
        self.queued_slots = 0
        self._one = torch.ones((1, 1), **f64)  # expanded, never written
        self._one_i64 = torch.ones(1, **i64)

    def add_routing(self, domain: int, shape: tuple[int, int], ids: torch.Tensor,
                    weights: torch.Tensor, norms: torch.Tensor,
                    contributions: torch.Tensor | None = None) -> None:
        """Add one batch. ids, weights, norms: [T, k]; `contributions` [T, k] replaces
        weight x norm in the REAP sum when the model applies the weight elsewhere (Llama-4).
        The tensors are kept (not copied) until the next flush."""
        import torch

        d, num_tokens = domain, ids.shape[0]
        self.positions[d] += num_tokens
        batch, seq = shape
        if batch * seq == num_tokens and seq > 1:
            top1 = ids.gather(1, weights.argmax(dim=1, keepdim=True)).view(batch, seq)
            self.top1_repeats[d:d + 1].add_((top1[:, 1:] == top1[:, :-1]).sum())
            self.top1_pairs[d] += batch * (seq - 1)
        rows = batch if batch > 0 and batch * seq == num_tokens else 1
        self.queue[d].append(_Queued(ids, weights, norms, contributions, rows))
        self.queued_slots += ids.numel()
        if self.trace:
            small = torch.int16 if self.num_experts < 2 ** 15 else torch.int32
            self.trace_parts[d].append((ids.detach().to(small), weights.detach().float()))
        if self.queued_slots >= QUEUE_SLOTS:
            self.flush()

    def flush(self) -> None:
        """Sum every queued batch into the accumulators (no host-device sync)."""
        import torch

        with torch.inference_mode():  # as in the forward pass: the sums may be inference tensors
            for d, queue in enumerate(self.queue):
                if queue:
                    self._add_queued(d, queue)
                    queue.clear()
        self.queued_slots = 0

    def _add_queued(self, d: int, queue: list[_Queued]) -> None:
        """The batches of `queue`, concatenated in order: slots (1, w, n, reap) as float64
        rows `src` [N, 4] into `sums`, max_norm, co-activation pairs, per-window parts."""
        import torch

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        ids = cat([q.ids for q in queue])
        flat = ids.reshape(-1)
        wn = torch.stack((cat([q.weights for q in queue]).reshape(-1),
                          cat([q.norms for q in queue]).reshape(-1)), 1).to(torch.float64)
        if all(q.contributions is None for q in queue):
            reap = wn.prod(1, keepdim=True)  # w * n, exactly
        else:
            reap = cat([(q.weights.to(torch.float64) * q.norms.to(torch.float64))
                        if q.contributions is None else q.contributions.to(torch.float64)
                        for q in queue]).reshape(-1, 1)
        src = torch.cat((self._one.expand(flat.shape[0], 1), wn, reap), 1)
        self.sums[d].index_add_(0, flat, src)
        self.max_norm[d].scatter_reduce_(0, flat, src[:, 2], reduce="amax")
        pairs = torch.add(ids.unsqueeze(1), ids.unsqueeze(2), alpha=self.num_experts)
        self.coact[d].index_add_(0, pairs.reshape(-1), self._one_i64.expand(pairs.numel()))
        self._add_windows(d, queue, ids, src)

    def _add_windows(self, domain: int, queue: list[_Queued], ids: torch.Tensor,
                     src: torch.Tensor) -> None:
        """Per-window slot counts, gate-weight, EAN and REAP sums of the queued batches,
        [rows, E] each, as one float32 [rows * E, 4] index_add (window r of a batch: its tokens
        [r S, (r+1) S))."""
        import torch

        num_experts, device = self.num_experts, ids.device
        lengths = {q.ids.shape[0] // q.rows for q in queue}
        if len(lengths) == 1:  # one window length (the usual case): windows follow each other
            row = torch.arange(ids.shape[0], device=device) // max(lengths.pop(), 1)
        else:
            starts = [0]
            for q in queue:
                starts.append(starts[-1] + q.rows)
            row = torch.cat([torch.arange(q.ids.shape[0], device=device)
                             // max(q.ids.shape[0] // q.rows, 1) + start
                             for q, start in zip(queue, starts, strict=False)])
        rows = sum(q.rows for q in queue)
        slot = (row.unsqueeze(1) * num_experts + ids).reshape(-1)
        part = torch.zeros((rows, num_experts, 4), dtype=torch.float32, device=device)
        part.view(-1, 4).index_add_(0, slot, src[:, (0, 3, 1, 2)].to(torch.float32))
        self.window_parts[domain].append(part.unbind(-1))

    def add_entropy(self, domain: int, logits: torch.Tensor, scoring: Scoring) -> None:
        """Add sum_t H(p_t) for router logits [T, E]; p = softmax(z), or for sigmoid routers the
        normalised scores sigmoid(z) / sum sigmoid(z). Natural log (nats)."""
        import torch

        z = logits.detach().reshape(-1, logits.shape[-1]).float()
        if scoring == "sigmoid":
            logp = torch.nn.functional.logsigmoid(z)
            logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        else:
            logp = torch.log_softmax(z, dim=-1)
        # sum_t H = -sum_t sum_e p log p; subtracting the positive sum saves the negation
        self.entropy_sum[domain:domain + 1].sub_((logp.exp() * logp).sum(dim=-1).sum())

    def finish(self) -> LayerRaw:
        """Copy the sums to the host (the one synchronisation point)."""
        import numpy as np
        import torch

        self.flush()
        num_domains, num_experts = self.max_norm.shape
        trace = {}
        for d, parts in enumerate(self.trace_parts):
            if parts:
                trace[d] = (torch.cat([p[0] for p in parts]).cpu().numpy(),
                            torch.cat([p[1] for p in parts]).cpu().numpy())
        windows = [[torch.cat([p[i] for p in parts]).to(dtype).cpu().numpy() if parts else
                     np.zeros((0, num_experts), dtype=np.int32 if i == 0 else np.float32)
                     for parts in self.window_parts]
                   for i, dtype in ((0, torch.int32), (1, torch.float32), (2, torch.float32),
                                    (3, torch.float32))]
        sums = self.sums.cpu().numpy()
        return LayerRaw(
            layer=self.layer, num_experts=num_experts,
            tokens=sums[..., 0].astype(np.int64), weight_sum=sums[..., 1].copy(),
            ean_sum=sums[..., 2].copy(), reap_sum=sums[..., 3].copy(),
            max_norm=self.max_norm.cpu().numpy(),
            coact=self.coact.cpu().numpy().reshape(num_domains, num_experts, num_experts),
            positions=np.asarray(self.positions, dtype=np.int64),
            entropy_sum=self.entropy_sum.cpu().numpy(),
            top1_pairs=np.asarray(self.top1_pairs, dtype=np.int64),
            top1_repeats=self.top1_repeats.cpu().numpy(), trace=trace,
            window_tokens=windows[0], window_reap=windows[1], window_weight=windows[2],
            window_ean=windows[3])


class Recorder:
    """Holds one LayerAccumulator per MoE layer and the position of the current batch
    (which domain, and its [B, S] shape, for the within-window temporal statistics)."""

    def __init__(self, num_domains: int, trace: bool = False):
        self.num_domains = num_domains
        self.trace = trace
        self.layers: dict[int, LayerAccumulator] = {}
        self.domain = 0
        self.shape: tuple[int, int] = (0, 0)

    def add_layer(self, layer: int, num_experts: int, device: Any) -> LayerAccumulator:
        acc = LayerAccumulator(layer, num_experts, self.num_domains, device, self.trace)
        self.layers[layer] = acc
        return acc

    def set_batch(self, domain: int, shape: tuple[int, int]) -> None:
        """Declare the domain index and [B, S] shape of the next forward pass."""
        self.domain, self.shape = domain, (int(shape[0]), int(shape[1]))

    def finish(self) -> list[LayerRaw]:
        return [self.layers[i].finish() for i in sorted(self.layers)]
