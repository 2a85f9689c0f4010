"""Scaled dot-product attention for every model, token-major in and out.

Which kernel runs is decided per backend in `backend.attention_kernel()`:

- "fused": MLX's `mx.fast.scaled_dot_product_attention` (Metal, CUDA, macOS CPU), over query blocks when the score
  matrix would be large, so that 1024x1024 images and above stay within memory.
- "blocked" (x86/Linux CPU, float32; no mask, or the text towers' causal one): MLX's CPU exp is scalar there (~15 ns
  per element; numpy's vectorised exp ~1.5 ns), which made 4,096-token self-attention cost several seconds per
  layer. This path runs each head's query blocks on one worker thread per core: `q k^T` into a score block that
  stays in the cache, numpy's `exp` in place, `p v`, with the BLAS (`cpu_blas.sgemm`: MKL's, else numpy's)
  single-threaded inside each worker (many small multithreaded BLAS calls stall on thread hand-offs). The scale
  rides along in the first product (BLAS's alpha) and the row sum in the second (see `_blocked`), so `exp` is the
  only elementwise pass over the scores (as `exp2`, with log2(e) folded into the scale: numpy's `exp2` takes 0.39 ns
  per element here against `exp`'s 0.56), unshifted, with an exact redo where that under- or overflows. Small heads
  go in groups (`_small_heads`), which also take the CLIP text towers' causal mask (MLX's CPU kernel took 4.9 ms per
  CLIP-L layer, 9.5 ms per OpenCLIP-G layer; these 2.0 and 2.3 ms).

Models call `attention()` and never reshape heads themselves.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import backend, cpu_blas, cpu_kernels
from .cpu_blas import sgemm, sgemm_batch

# The fused path's score matrix is computed in query blocks of at most this many bytes (all heads together).
FUSED_BLOCK_BYTES = 256 * 2**20
# One blocked-path score block (rows x keys float32) per worker: small enough that the product, the exp and the second
# product find it in the caches (L3 here), large enough for efficient BLAS calls (measured best of 0.25-16 MiB).
SCORE_BLOCK_BYTES = 4 * 2**20
LOG2_E = 1.4426950408889634
# Below this many scores (B * heads * N * M) the blocked path's set-up (~1.4 ms) costs more than it saves. Measured
# against MLX's CPU kernel: 16,384 scores 1.38 vs 0.55 ms, 24,640 1.46 vs 1.14, 65,536 1.51 vs 2.00, 142,296 (CLIP-L,
# causal) 2.0 vs 5.1, 163,840 1.55 vs 6.6.
BLOCKED_MIN_SCORES = 2**16
# Heads of at most this many scores (N * M) run as `_small_heads`, in groups with batched products. Measured: 2**20
# (1024-token heads, 4096x77 cross-attention) made those slower than the query blocks of `_blocked`.
SMALL_HEAD_SCORES = 2**18
# From this many heads (windows x heads), channel attention runs as `_channels_blocked` on the blocked backend. DAT's
# (a few heads over the whole image: large products) stay on MLX's matmul.
CHANNEL_HEADS_MIN = 64


def attention(
    q: mx.array, k: mx.array, v: mx.array, heads: int, mask: mx.array | str | None = None, scale: float | None = None
) -> mx.array:
    """softmax(q k^T / sqrt(d)) v over `heads` heads of width d = C / heads.

    Args:
        q: (B, N, C) queries.
        k: (B, M, C) keys; v: (B, M, Cv) values (Cv = C but for RGT's recursive attention).
        heads: number of heads.
        mask: None, "causal", or an additive/boolean array broadcastable to (B, heads, N, M).
        scale: the logits' factor, if not 1 / sqrt(d).
    Returns:
        (B, N, Cv).
    """
    B, N, C = q.shape
    M = k.shape[1]
    scale = (C // heads) ** -0.5 if scale is None else scale
    if B * heads * N * M >= BLOCKED_MIN_SCORES and backend.attention_kernel(q.dtype) == "blocked":
        if mask is None:
            return _blocked(q, k, v, heads, scale)
        if isinstance(mask, str) and mask == "causal" and N == M and N * M <= SMALL_HEAD_SCORES:
            return _blocked(q, k, v, heads, scale, causal=True)
    return _fused(q, k, v, heads, mask, scale)


def window_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    heads: int,
    bias: mx.array | None,
    mask: mx.array | None = None,
    scale: float | None = None,
    unbounded: bool = False,
) -> mx.array:
    """softmax(q k^T / sqrt(d) + bias + mask) v within windows: Swin's attention (SwinIR, DAT, ScuNET), HAT's
    overlapping cross-attention (keys from a larger window around each query window), ATD's category groups.

    Args:
        q: (Bw, N, C) the windows' queries; k, v: (Bw, M, C) their keys and values (slices of one fused projection,
            `mx.split(qkv, 3, axis=-1)`, are read in place), the heads side by side in the channels.
        heads: number of heads.
        bias: (heads, N, M) additive, shared by every window (the relative position bias), or None.
        mask: None, or (nW, N, M) additive: window w of every image (Bw = images x nW) takes mask[w % nW].
        scale: the logits' factor, if not 1 / sqrt(d).
        unbounded: logits may leave float32 exp's range (ATD's, scaled up to 100x): the blocked path subtracts each
            row's max first, instead of redoing the windows that overflow.
    Returns:
        (Bw, N, C).

    On the "blocked" backend (x86 CPU) `_windows_blocked`; elsewhere MLX's fused kernel over (images, nW x heads)
    with bias and mask summed into one (nW x heads, N, M) mask.
    """
    Bw, N, C = q.shape
    M = k.shape[1]
    scale = (C // heads) ** -0.5 if scale is None else scale
    if Bw * heads * N * M >= BLOCKED_MIN_SCORES and backend.attention_kernel(q.dtype) == "blocked":
        return _windows_blocked(q, k, v, heads, bias, mask, scale, unbounded)
    nW = 1 if mask is None else mask.shape[0]
    if bias is None and mask is None:
        combined = None
    else:
        bias = mx.zeros((heads, N, M), q.dtype) if bias is None else bias
        combined = bias[None] if mask is None else bias[None] + mask[:, None]  # (nW, heads, N, M)
        combined = combined.reshape(nW * heads, N, M).astype(q.dtype)
    q, k, v = (x.reshape(Bw // nW, nW, x.shape[1], heads, C // heads) for x in (q, k, v))
    q, k, v = (x.transpose(0, 1, 3, 2, 4).reshape(Bw // nW, nW * heads, x.shape[2], C // heads) for x in (q, k, v))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=combined)
    return out.reshape(Bw, heads, N, C // heads).transpose(0, 2, 1, 3).reshape(Bw, N, C)


def channel_attention(q: mx.array, k: mx.array, v: mx.array, temperature: mx.array) -> mx.array:
    """softmax(q' k'^T x temperature) v with q', k' = q, k L2-normalised along the pixels (torch's F.normalize, eps
    1e-12): the "transposed" attention whose tokens are channels (DAT's over the whole image; OmniSR's within windows).

    Args:
        q, k, v: (..., heads, d, n): per head, d channels over n pixels.
        temperature: (heads, 1, 1), per head.
    Returns:
        (..., heads, d, n).

    Many small heads (OmniSR's: a 16 x 16 product per window and head) run as `_channels_blocked` on the "blocked"
    backend: MLX's CPU matmul took 14 ms for 576 products of 16 x 64 by 64 x 16 (one BLAS call each).
    """
    if q.size // (q.shape[-2] * q.shape[-1]) >= CHANNEL_HEADS_MIN and backend.attention_kernel(q.dtype) == "blocked":
        return _channels_blocked(q, k, v, temperature)
    q, k = (t / mx.maximum(mx.linalg.norm(t, axis=-1, keepdims=True), 1e-12) for t in (q, k))
    return mx.softmax((q @ k.swapaxes(-1, -2)) * temperature, axis=-1, precise=True) @ v


def _channels_blocked(q: mx.array, k: mx.array, v: mx.array, temperature: mx.array) -> mx.array:
    """`channel_attention` in numpy on worker threads, each over a run of heads: batched BLAS products
    (`sgemm_batch`) and a max-shifted softmax (temperatures are learned: the logits are not bounded)."""
    shape, (d, n) = q.shape, q.shape[-2:]
    mx.eval(q, k, v, temperature)
    qn, kn, vn = (np.asarray(x).reshape(-1, d, n) for x in (q, k, v))
    heads = temperature.shape[0]
    scales = np.broadcast_to(np.asarray(temperature.astype(mx.float32)).reshape(heads), (len(qn) // heads, heads))
    scales = scales.reshape(-1, 1, 1)
    out = np.empty(qn.shape, np.float32)
    step = -(-len(qn) // (2 * backend.cpu_threads()))

    def run(start):
        a, b = (x[start : start + step] for x in (qn, kn))
        a, b = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12)) for x in (a, b))
        scores = sgemm_batch(a, b.transpose(0, 2, 1), np.empty((len(a), d, d), np.float32))
        scores *= scales[start : start + step]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        sgemm_batch(scores, vn[start : start + step], out[start : start + step])

    with cpu_blas.numpy_blas_single_threaded():
        backend.cpu_map(run, list(range(0, len(qn), step)))
    return mx.array(out).reshape(shape)


def _windows_blocked(q: mx.array, k: mx.array, v: mx.array, heads: int, bias, mask, scale: float, unbounded: bool):
    """`window_attention` as `_small_heads` works (BLAS batched products on worker threads, exp2 unshifted with the
    exact redo), with the windows as the batch: each task takes one head of a run of windows within one image, reads
    their q, k and v in place (one stride between windows), adds the head's bias and the windows' masks (in base-2
    units) to the scaled logits, and writes into the token-major output. MLX's own path (score products per window
    and head, a bias pass, a mask pass and its scalar exp) took 2x torch's time."""
    Bw, N, C = q.shape
    M = k.shape[1]
    d = C // heads
    scale = scale * LOG2_E
    mx.eval(q, k, v, *(x for x in (bias, mask) if x is not None))
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    add = None if bias is None else np.asarray(bias.astype(mx.float32)) * np.float32(LOG2_E)  # (heads, N, M)
    nW = Bw if mask is None else mask.shape[0]  # runs of windows stay within one image (the masks' cycle)
    shift = None if mask is None else np.asarray(mask.astype(mx.float32)) * np.float32(LOG2_E)  # (nW, N, M)
    out = np.empty((Bw, N, C), np.float32)
    per_task = max(1, min(SCORE_BLOCK_BYTES // (4 * N * M), -(-Bw * heads // (2 * backend.cpu_threads()))))
    runs = [(w, min(w + per_task, i + nW)) for i in range(0, Bw, nW) for w in range(i, i + nW, per_task)]
    tasks = [(h, w0, w1) for h in range(heads) for w0, w1 in runs]
    ones = np.ones((M, 1), np.float32)

    def run(task):
        h, w0, w1 = task
        n = w1 - w0
        q, k, v = (x[w0:w1, :, h * d : (h + 1) * d] for x in (qn, kn, vn))  # (n, N or M, d) views
        scores = sgemm_batch(q, k.transpose(0, 2, 1), np.empty((n, N, M), np.float32), alpha=scale)
        if add is not None:
            scores += add[h]
        window_masks = None if shift is None else shift[w0 % nW : w0 % nW + n]
        if window_masks is not None:
            scores += window_masks
        if unbounded:  # each row's largest weight 1: nothing overflows, and row sums are >= 1
            scores -= scores.max(axis=-1, keepdims=True)
        with np.errstate(over="ignore"):  # overflow is checked below and the windows redone exactly
            _exp2(scores)
        sums = (scores.reshape(-1, M) @ ones).reshape(n, N, 1)
        o = out[w0:w1, :, h * d : (h + 1) * d]  # (n, N, d) view, heads interleaved
        with np.errstate(over="ignore", invalid="ignore"):
            np.divide(sgemm_batch(scores, v, np.empty((n, N, d), np.float32)), sums, out=o)
        if not (sums.min() >= _SMALLEST_ROW_SUM and np.isfinite(sums).all() and np.isfinite(o).all()):
            for i in range(n):
                extra = np.zeros((N, M), np.float32) if add is None else add[h]
                o[i] = _exact_head(q[i], k[i], v[i], scale, extra if window_masks is None else extra + window_masks[i])

    with cpu_blas.numpy_blas_single_threaded():
        backend.cpu_map(run, tasks)
    return mx.array(out)


def _split_heads(x: mx.array, heads: int) -> mx.array:
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).transpose(0, 2, 1, 3)  # (B, h, N, d)


def _fused(q: mx.array, k: mx.array, v: mx.array, heads: int, mask, scale: float) -> mx.array:
    """MLX's fused kernel, over query blocks when the scores would exceed FUSED_BLOCK_BYTES."""
    B, N, _ = q.shape
    M = k.shape[1]
    q, k, v = (_split_heads(x, heads) for x in (q, k, v))
    rows = max(1, FUSED_BLOCK_BYTES // (B * heads * M * 4))
    if rows >= N or mask is not None:  # masks are only used by the 77-token text towers
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    else:
        blocks = []
        for r in range(0, N, rows):
            blocks.append(mx.fast.scaled_dot_product_attention(q[:, :, r : r + rows], k, v, scale=scale))
            mx.eval(blocks[-1])  # bound memory: one block of scores alive at a time
        out = mx.concatenate(blocks, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(B, N, -1)


def _blocked(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float, causal: bool = False) -> mx.array:
    """CPU attention: BLAS products and numpy's exp2 over per-head query blocks, one worker thread per core.

    softmax(s_i) v = (exp(s_i) v) / sum_j exp(s_ij). Each block's logits come from one product that reads q and k in
    place and applies the scale through BLAS's alpha; exp2 runs on them in place, unshifted; a column of ones
    appended to v makes the second product return the row sums in its last column. Unshifted exp2 is exact in float32
    for base-2 logits in (-126, 128), and SD's stay within +-40 (natural units, scaled); a block with a row sum
    below 2^-60 (underflow) or anything non-finite (overflow, or NaN) is redone with the exact row max
    (`_exact_head`). A shift by a sampled row max, as this kernel had before, cost 7-20% more (a product per block
    for the sample, a copy of q with a shift column).

    Heads are read in place from the (B, N, C) inputs (strided views that BLAS takes as they are) and written in
    place into a (B, N, C) output; v's ones column is made per task inside the workers, so that nothing but the
    products runs outside them (the set-up in MLX had cost more than a cross-attention's products).

    `causal` (query i sees keys 0..i) is taken by the small heads alone: the text towers' 77 tokens.
    """
    B, N, C = q.shape
    M = k.shape[1]
    d, dv = C // heads, v.shape[2] // heads
    scale = scale * LOG2_E  # scores in base-2 units: exp2(s log2 e) = exp(s)
    mx.eval(q, k, v)
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))  # float32 (backend.attention_kernel), zero-copy views
    if N * M <= SMALL_HEAD_SCORES:
        return mx.array(_small_heads(qn, kn, vn, heads, scale, causal))
    if causal:
        raise ValueError(f"causal attention over {N} x {M} tokens: only heads of <= {SMALL_HEAD_SCORES} scores take it")
    out = np.empty((B, N, heads * dv), np.float32)

    rows = max(1, min(N, SCORE_BLOCK_BYTES // (4 * M)))
    workers = backend.cpu_threads()
    # Enough tasks to keep every worker busy: whole heads, or row ranges when there are fewer heads than workers.
    per_head = max(1, -(-2 * workers // (B * heads)))
    bounds = np.linspace(0, N, per_head + 1).astype(int)
    spans = [(r0, r1) for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True) if r1 > r0]
    tasks = [(b, h, r0, r1) for b in range(B) for h in range(heads) for r0, r1 in spans]

    def run(task):
        b, h, r0, r1 = task
        cols, out_cols = slice(h * d, (h + 1) * d), slice(h * dv, (h + 1) * dv)
        k, v = kn[b, :, cols], vn[b, :, out_cols]  # (M, d) and (M, dv) views
        v1 = _with_ones(v)  # (M, dv + 1)
        scores = np.empty((rows, M), np.float32)
        for r in range(r0, r1, rows):
            n = min(rows, r1 - r)
            s, q = scores[:n], qn[b, r : r + n, cols]
            sgemm(q, k.T, out=s, alpha=scale)
            with np.errstate(over="ignore"):  # overflow is checked below and the block redone exactly
                _exp2(s)
            o = sgemm(s, v1)  # (n, dv + 1): weighted values and the row sums
            if o[:, dv].min() >= _SMALLEST_ROW_SUM and np.isfinite(o).all():
                np.divide(o[:, :dv], o[:, dv:], out=out[b, r : r + n, out_cols])
            else:
                out[b, r : r + n, out_cols] = _exact_head(q, k, v, scale)

    with cpu_blas.numpy_blas_single_threaded():
        backend.cpu_map(run, tasks)
    return mx.array(out)


def _small_heads(
    qn: np.ndarray, kn: np.ndarray, vn: np.ndarray, heads: int, scale: float, causal: bool = False
) -> np.ndarray:
    """`_blocked`'s work for heads whose scores fit in one block (SDXL's and SD2's 20 heads at 256 tokens), where
    per-head set-up (copies, Python calls) had cost more than the products: 20 heads of 256 tokens took 2.6x torch's
    time with `_blocked`'s set-up per head, 1.8x with it batched.

    Here q, k and v are not copied: each worker task takes a group of heads (scores within a score block), reads
    their q and k in place from the token-major inputs for one batched product, scaled by BLAS (`alpha`), then exp2
    in place, the row sums (a product with ones), and `p v` for all its heads by one batched product into a buffer,
    divided by the row sums into the token-major output (where the heads interleave). Without a shift: exp2 of the
    raw logits is exact in float32 for logits in (-126, 128) (base 2; SD's are within +-40), and a head group whose
    row sums fall outside [2^-60, inf), or whose output is not finite, is redone with the exact row max. A causal
    mask is added to the logits as -inf above the diagonal, which exp2 turns into weights of 0.
    """
    B, N, _ = qn.shape
    M = kn.shape[1]
    dv = vn.shape[2] // heads
    out = np.empty((B, N, heads * dv), np.float32)
    mask = np.triu(np.full((N, M), -np.inf, np.float32), 1) if causal else None
    groups = max(-(-heads * N * M * 4 // SCORE_BLOCK_BYTES), -(-2 * backend.cpu_threads() // B))
    bounds = [heads * i // min(heads, groups) for i in range(min(heads, groups) + 1)]
    tasks = [(b, h0, h1) for b in range(B) for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True)]

    def run(task):
        b, h0, h1 = task
        q, k, v = (x[b].reshape(x.shape[1], heads, -1)[:, h0:h1].transpose(1, 0, 2) for x in (qn, kn, vn))  # (g, n, d)
        scores = sgemm_batch(q, k.transpose(0, 2, 1), np.empty((h1 - h0, N, M), np.float32), alpha=scale)
        if mask is not None:
            scores += mask
        with np.errstate(over="ignore"):  # overflow is checked below and the heads redone exactly
            _exp2(scores)
        # Row sums as a product with ones (0.12 ms for 10 x 256 x 256 scores, numpy's sum 0.35 ms); `p v` into a
        # contiguous buffer, divided into the interleaved output (written there directly: 1.18 against 0.81 ms).
        sums = (scores.reshape(-1, M) @ np.ones((M, 1), np.float32)).reshape(h1 - h0, N, 1)
        o = out[b].reshape(N, heads, dv)[:, h0:h1].transpose(1, 0, 2)  # (g, N, dv) view, heads interleaved
        with np.errstate(over="ignore", invalid="ignore"):
            np.divide(sgemm_batch(scores, v, np.empty((h1 - h0, N, dv), np.float32)), sums, out=o)
        if not (
            sums.min() >= _SMALLEST_ROW_SUM
            and np.isfinite(sums).all()
            and np.isfinite(out[b, :, h0 * dv : h1 * dv]).all()
        ):
            for i, h in enumerate(range(h0, h1)):
                out[b, :, h * dv : (h + 1) * dv] = _exact_head(q[i], k[i], v[i], scale, mask)

    with cpu_blas.numpy_blas_single_threaded():
        backend.cpu_map(run, tasks)
    return out


# A row of shift-free weights summing to at least this has its largest weight >= 2^-60 / M, far inside float32's
# normal range, so weights that underflow there are below 2^-66 of it and change nothing.
_SMALLEST_ROW_SUM = 2.0**-60


def _exact_head(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray | None = None):
    """softmax(scale q k^T + mask, base 2) v for one head, with the exact row max subtracted."""
    s = sgemm(q, k.T, alpha=scale)
    if mask is not None:
        s += mask
    s -= s.max(axis=-1, keepdims=True)
    np.exp2(s, out=s)
    return sgemm(s, v) / s.sum(axis=-1, keepdims=True)


def _exp2(x: np.ndarray) -> None:
    """2^x in place: numba's vectorised kernel where the CPU kernels run (cpu_kernels.exp2), else numpy's."""
    if backend.row_kernels(mx.float32) == "numba":
        cpu_kernels.exp2(x)
    else:
        np.exp2(x, out=x)


def _with_ones(x: np.ndarray) -> np.ndarray:
    """(M, d) -> (M, d + 1) with a last column of ones."""
    out = np.empty((x.shape[0], x.shape[1] + 1), np.float32)
    out[:, :-1] = x
    out[:, -1] = 1
    return out
