"""VectorQuantizer: VQ-VAE vector quantization (``mode="vector"``) and the signed-root
pairwise-product variant (``mode="outer"``), with EMA or gradient codebooks, k-means init,
dead-code restarts and process-group synchronisation that keeps codebooks bit-identical.

State (all in ``state_dict``): ``embed`` (the codebook, a buffer for ``update="ema"``, an
``nn.Parameter`` for ``update="loss"``), ``cluster_size``/``embed_sum`` (EMA only),
``usage_ema`` (dead-code tracker), ``initialized`` and ``step``. The last two have Python
mirrors refreshed by a ``load_state_dict`` hook, so the forward never reads a device value.
If you load buffers in place without ``load_state_dict`` (e.g. a raw
``torch.distributed.checkpoint.load`` into ``state_dict()`` tensors), call
:meth:`VectorQuantizer.refresh_from_buffers` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import nn

from vq_torchrec.quantization.dead_codes import dead_mask, reset_share
from vq_torchrec.quantization.distances import DenseRows, code_counts, l2_normalize
from vq_torchrec.quantization.distributed import (
    ProcessGroup,
    all_reduce_sum_,
    broadcast_from_first_,
    resolve_group,
)
from vq_torchrec.quantization.ema import ema_codebook, ema_reset_, ema_update_
from vq_torchrec.quantization.fast_search import nearest_codes_bf16
from vq_torchrec.quantization.kmeans import kmeans
from vq_torchrec.quantization.losses import outer_loss, vector_loss
from vq_torchrec.quantization.outer import OuterRows, outer_decode, outer_factors
from vq_torchrec.quantization.output import VQOutput
from vq_torchrec.quantization.rotation import rotation_trick, straight_through
from vq_torchrec.quantization.sampling import shared_sample
from vq_torchrec.quantization.stats import perplexity, usage
from vq_torchrec.quantization.validation import validate_input, validate_quantizer_args

Rows = Union[DenseRows, OuterRows]


class QuantizeResult:
    """Internal per-call result (fp32): ``q`` detached ``(N, d)``, ``codes``, ``loss``, ``counts (K,)``."""

    __slots__ = ("q", "codes", "loss", "counts")

    def __init__(self, q: torch.Tensor, codes: torch.Tensor, loss: torch.Tensor, counts: torch.Tensor) -> None:
        self.q, self.codes, self.loss, self.counts = q, codes, loss, counts


class VectorQuantizer(nn.Module):
    """Quantize ``z`` of shape ``(N, dim)`` (or ``(*, dim)``) against ``codebook_size`` codes.

    Args:
        dim: size of each vector.
        codebook_size: number of codes ``K``.
        mode: ``"vector"``: each ``z_n`` gets one code, ``codes (N,)``. ``"outer"``: each row
            ``s_i * s`` of ``outer(s, s)``, ``s = sign(z) sqrt(|z|)``, gets a code,
            ``codes (N, dim)``; ``quantized[:, i] = sign(z_i) * codebook[code_i][i]``
            (see :mod:`vq_torchrec.quantization.outer`).
        distance: ``"l2"``, or ``"cosine"`` (unit codes; the output keeps ``z``'s norm:
            ``quantized = ||z|| * c_hat``, so it still approximates ``z``).
        update: ``"ema"`` (VQ-VAE-2 EMA codebook, buffer) or ``"loss"`` (``nn.Parameter``
            trained by the codebook term of the loss).
        commitment_weight: ``beta`` on ``mean((z - sg[e])^2)``.
        decay, eps: EMA decay and Laplace smoothing.
        kmeans_init, kmeans_iters: codebook from k-means on the first training batch
            (synchronised over the group). Without it the random init is broadcast from rank 0.
        dead_code_threshold: dead if EMA share of assignments < ``threshold / K``.
        restart_every: dead-code restart every this many training steps (0: never).
        rotation_trick: rotation-trick gradients instead of straight-through.
        chunk_size: rows scored at once (memory ``chunk_size * K`` floats).
        search_precision: ``"fp32"`` (default, exact search) or ``"bf16"`` (``mode="vector"``
            only): a bf16 GEMM proposes a few candidate codes per row and the exact fp32 score
            picks among them (:func:`~vq_torchrec.quantization.fast_search.nearest_codes_bf16`;
            it agrees with the fp32 search on about 99.9+ % of rows and otherwise picks a code
            within bf16 rounding of the optimum). Used by ``forward`` and ``encode``; k-means
            init, statistics and losses stay fp32. On CPU with the C++ kernel
            (:mod:`vq_torchrec.quantization.native`) both settings run its certified search:
            exact, and faster than either torch search.
        process_group: group to keep the codebook identical over (default: WORLD when
            ``torch.distributed`` is initialised, else none).

    Training mode (``module.train()``) updates the codebook/statistics; eval mode never
    changes any state. All statistics are fp32 (autocast is disabled inside); ``quantized``
    has ``z``'s dtype (fp16/bf16: saturated at the dtype's largest finite value). In
    training, ``perplexity``/``usage`` come from the histogram summed over the group; in eval
    from the local batch. The first training batch with rows runs k-means (or, without it,
    broadcasts rank 0's random codebook); after k-means the EMA statistics start from that
    batch's assignment (codes k-means left empty get a count of 1). With ``update="loss"`` restarts overwrite codebook rows
    in place (optimizer moments of those rows are not reset).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 256,
        *,
        mode: str = "vector",
        distance: str = "l2",
        update: str = "ema",
        commitment_weight: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.03,
        restart_every: int = 100,
        rotation_trick: bool = False,
        chunk_size: int = 8192,
        search_precision: str = "fp32",
        process_group: ProcessGroup = None,
    ) -> None:
        super().__init__()
        validate_quantizer_args(
            dim=dim,
            codebook_size=codebook_size,
            mode=mode,
            distance=distance,
            update=update,
            commitment_weight=commitment_weight,
            decay=decay,
            eps=eps,
            kmeans_iters=kmeans_iters,
            dead_code_threshold=dead_code_threshold,
            restart_every=restart_every,
            chunk_size=chunk_size,
            search_precision=search_precision,
        )
        self.dim = dim
        self.codebook_size = codebook_size
        self.mode = mode
        self.distance = distance
        self.update = update
        self.commitment_weight = float(commitment_weight)
        self.decay = float(decay)
        self.eps = float(eps)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_every = restart_every
        self.rotation_trick = bool(rotation_trick)
        self.chunk_size = chunk_size
        self.search_precision = search_precision
        self._group = _GroupRef(process_group)

        init = self._random_codebook()
        if update == "loss":
            self.embed = nn.Parameter(init)
        else:
            self.register_buffer("embed", init)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", init.clone())
        self.register_buffer("usage_ema", torch.zeros(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self._initialized = False
        self._step = 0
        self._fresh_init = False
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def process_group(self) -> ProcessGroup:
        """The group given at construction (``None``: WORLD when initialised, resolved per call)."""
        return self._group.group

    def _random_codebook(self) -> torch.Tensor:
        init = torch.randn(self.codebook_size, self.dim)
        return l2_normalize(init) if self.distance == "cosine" else init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to a fresh, uninitialised state (random codebook, zero statistics), on the
        current device; used after ``to_empty`` when the module was built on ``meta``."""
        device = self.embed.device
        init = self._random_codebook().to(device)
        self.embed.copy_(init)
        if self.update == "ema":
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(init)
        self.usage_ema.zero_()
        self.initialized.fill_(False)
        self.step.zero_()
        self._initialized = False
        self._step = 0
        self._fresh_init = False

    # ------------------------------------------------------------------ public helpers
    @property
    def codebook(self) -> torch.Tensor:
        """``(K, dim)`` fp32 codebook the codes index (unit rows for cosine), detached."""
        return self._effective_codebook().detach()

    def refresh_from_buffers(self) -> None:
        """Re-read the ``initialized``/``step`` buffers into their Python mirrors (one host read)."""
        self._initialized = bool(self.initialized)
        self._step = int(self.step)
        self._fresh_init = False

    def dead_code_count(self) -> torch.Tensor:
        """Long 0-d number of codes the tracker considers dead."""
        return dead_mask(self.usage_ema, self.dead_code_threshold).sum()

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes for ``z`` (``(N,)`` vector / ``(N, dim)`` outer, long); no grad, no state change."""
        validate_input(z, self.dim)
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.reshape(-1, self.dim).float()
            rows, _ = self._rows(z32)
            codes = self.assign(rows, self.codebook)
        return codes.reshape(*lead, *codes.shape[1:])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(*, dim)`` fp32 code vectors for ``mode="vector"`` codes (unit vectors for cosine).
        Outer-mode outputs need the signs of ``z`` and are only produced by ``forward``."""
        if self.mode != "vector":
            raise ValueError("VectorQuantizer.decode: mode='outer' outputs need sign(z); use forward(z)")
        if codes.dtype != torch.long:
            raise TypeError(f"VectorQuantizer.decode: expected long codes, got dtype {codes.dtype}")
        return self.codebook[codes]

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor) -> VQOutput:
        """``z (*, dim)`` -> :class:`VQOutput` (``quantized`` in ``z``'s dtype and shape)."""
        validate_input(z, self.dim)
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z2 = z.reshape(-1, self.dim)
            z32 = z2.float()
            res = self.quantize_fp32(z32)
            quantized = self._estimator(z2, z32, res.q)
        codes = res.codes.reshape(*lead, *res.codes.shape[1:])
        return VQOutput(
            quantized=quantized.reshape(z.shape),
            codes=codes,
            loss=res.loss,
            perplexity=perplexity(res.counts),
            usage=usage(res.counts),
            dead_codes=self.dead_code_count(),
        )

    def quantize_fp32(self, z32: torch.Tensor) -> QuantizeResult:
        """Core step on ``(N, dim)`` fp32 rows: codes, detached ``q``, loss and the code
        histogram (global over the group in training). Updates state in training mode."""
        rows, factors = self._rows(z32)
        group = resolve_group(self.process_group) if self.training else None
        if self.training and not self._initialized:
            self._initialize(rows, group, z32.device)
        codebook = self._effective_codebook()
        codes = self.assign(rows, codebook.detach())
        train_codebook = self.update == "loss"
        if self.mode == "vector":
            e = codebook.index_select(0, codes)  # (N, d); grad to the codebook for update="loss"
            loss = vector_loss(factors[0], e, self.commitment_weight, train_codebook)
        else:
            loss = outer_loss(
                factors[0], factors[1], codebook, codes, self.commitment_weight, train_codebook, self.chunk_size
            )
        with torch.no_grad():
            if self.mode == "vector":
                q = e.detach()
                if self.distance == "cosine":
                    q = q * z32.norm(dim=1, keepdim=True)
            else:
                q = self._decode_rows(z32, codebook.detach(), codes)
            if self.training:
                counts = self._train_update(rows, codes, group, z32.device)
            else:
                counts = code_counts(codes, self.codebook_size)
        return QuantizeResult(q, codes, loss, counts)

    def assign(self, rows: Rows, codebook: torch.Tensor) -> torch.Tensor:
        """Nearest codes of ``rows`` in the fp32 ``codebook`` ``(K, dim)`` with this
        quantizer's distance, chunking and ``search_precision``."""
        if self.search_precision == "bf16" and isinstance(rows, DenseRows):
            return nearest_codes_bf16(rows.x, codebook, self.distance, self.chunk_size)
        return rows.assign(codebook, self.distance, self.chunk_size)

    # ------------------------------------------------------------------ internals
    def _estimator(self, z: torch.Tensor, z32: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Output in ``z``'s dtype with value ``q``: STE to ``z``, or rotation trick via ``z32``."""
        if self.rotation_trick:
            return rotation_trick(z32, q, z.dtype)
        return straight_through(z32, q, z.dtype)

    def _effective_codebook(self) -> torch.Tensor:
        """fp32 copy of ``embed`` (normalised for cosine), differentiable for ``update="loss"``.
        A copy, so in-place codebook updates (EMA, restarts) never invalidate saved tensors."""
        embed = self.embed.float()
        if embed is self.embed:
            embed = embed.clone()
        return l2_normalize(embed) if self.distance == "cosine" else embed

    def _rows(self, z32: torch.Tensor) -> tuple[Rows, tuple[torch.Tensor, ...]]:
        """Rows to match (detached) and the differentiable factors for the loss."""
        if self.mode == "vector":
            x = l2_normalize(z32) if self.distance == "cosine" else z32
            return DenseRows(x.detach()), (x,)
        a, u = outer_factors(z32, self.distance)
        return OuterRows(a.detach(), u.detach()), (a, u)

    def _decode_rows(self, z32: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.mode == "outer":
            return outer_decode(z32, codebook, codes, self.distance)
        q = codebook.index_select(0, codes)
        if self.distance == "cosine":
            q = q * z32.norm(dim=1, keepdim=True)
        return q

    @torch.no_grad()
    def _initialize(self, rows: Rows, group: ProcessGroup, device: torch.device) -> None:
        if self.kmeans_init:
            if group is None and rows.num_rows == 0:
                return  # nothing to fit yet; try again on the next batch
            centres = kmeans(
                rows, self.codebook_size, self.dim, self.kmeans_iters, self.distance,
                self.chunk_size, group, device,
            )
            self.embed.copy_(centres)
            self._fresh_init = True
        else:
            broadcast_from_first_(self.embed.data, group)
            if self.update == "ema":
                broadcast_from_first_(self.cluster_size, group)
                broadcast_from_first_(self.embed_sum, group)
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def _train_update(self, rows: Rows, codes: torch.Tensor, group: ProcessGroup, device: torch.device) -> torch.Tensor:
        """EMA/usage update, step count and periodic restart; returns global ``counts (K,)``."""
        k = self.codebook_size
        sums: torch.Tensor | None = None
        if self.update == "ema":
            counts, sums = rows.sums(codes, k, self.chunk_size)
            buf = all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1), group)
            counts, sums = buf[:, 0], buf[:, 1:]
        else:
            counts = all_reduce_sum_(code_counts(codes, k), group)
        self.apply_global_stats(counts, sums, lambda: rows, group, device)
        return counts

    @torch.no_grad()
    def apply_global_stats(
        self,
        counts: torch.Tensor,
        sums: torch.Tensor | None,
        rows: Callable[[], Rows],
        group: ProcessGroup,
        device: torch.device,
    ) -> None:
        """One training step's state update from the batch statistics, already summed over
        ``group``: ``counts (K,)`` and, for ``update="ema"``, ``sums (K, dim)`` of the rows
        assigned to each code. Moves the EMA codebook, the dead-code tracker and ``step``, and
        every ``restart_every`` steps restarts dead codes from ``rows()`` (called only then).
        Used by :meth:`quantize_fp32` and by the grouped fast path of the VQ collections."""
        if self.update == "ema":
            assert sums is not None
            if self._fresh_init:
                ema_reset_(self.cluster_size, self.embed_sum, counts, sums, self.embed)
            else:
                ema_update_(self.cluster_size, self.embed_sum, counts, sums, self.decay)
            if self.distance == "l2" and self.embed.dtype == self.embed_sum.dtype:
                ema_codebook(self.cluster_size, self.embed_sum, self.eps, out=self.embed)  # no temporary
            else:
                embed = ema_codebook(self.cluster_size, self.embed_sum, self.eps)
                self.embed.copy_(l2_normalize(embed) if self.distance == "cosine" else embed)
        if self._fresh_init:
            self.usage_ema.copy_(counts)
            self._fresh_init = False
        else:
            self.usage_ema.lerp_(counts, 1.0 - self.decay)
        self.step.add_(1)
        self._step += 1
        if self.restart_every > 0 and self._step % self.restart_every == 0:
            self._restart_dead(rows(), group, device)

    @torch.no_grad()
    def _restart_dead(self, rows: Rows, group: ProcessGroup, device: torch.device) -> None:
        k = self.codebook_size
        candidates, ok = shared_sample(rows, k, self.dim, device, group)
        if self.distance == "cosine":
            candidates = l2_normalize(candidates)
        mask = dead_mask(self.usage_ema, self.dead_code_threshold) & ok
        col = mask.unsqueeze(1)
        self.embed.copy_(torch.where(col, candidates, self.embed.float()).to(self.embed.dtype))
        if self.update == "ema":
            size = reset_share(self.cluster_size, self.dead_code_threshold, floor=1.0)
            self.embed_sum.copy_(torch.where(col, candidates * size, self.embed_sum))
            self.cluster_size.copy_(torch.where(mask, size, self.cluster_size))
        self.usage_ema.copy_(torch.where(mask, reset_share(self.usage_ema, self.dead_code_threshold), self.usage_ema))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, mode={self.mode}, distance={self.distance}, "
            f"update={self.update}, commitment_weight={self.commitment_weight}, rotation_trick={self.rotation_trick}"
            + (f", search_precision={self.search_precision}" if self.search_precision != "fp32" else "")
        )


class _GroupRef:
    """Holds the process group; shared (not copied) by ``copy.deepcopy`` of the module."""

    __slots__ = ("group",)

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> _GroupRef:
        return self


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    if isinstance(module, VectorQuantizer):
        module.refresh_from_buffers()
