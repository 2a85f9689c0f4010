"""The fast CPU paths (blocked attention, rational activations, fused GroupNorm) against torch's kernels.

Model-level parity (tests/test_models.py) runs them too; these tests pin each kernel down on its own, including the
cases a model rarely reaches: the blocked attention's overflow fallback, query blocking, 1024x1024-sized shapes.
"""

import builtins

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_sd import attention as attention_module
from mlx_sd import backend, cpu_blas, cpu_kernels
from mlx_sd.attention import attention
from mlx_sd.models import layers, winograd
from oracles import assert_close, relative_error

pytestmark = pytest.mark.skipif(backend.on_gpu(), reason="the CPU kernels are what is tested here")


def _reference_attention(q, k, v, heads, causal=False):
    B, N, C = q.shape
    t = [torch.from_numpy(x).reshape(B, -1, heads, C // heads).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*t, is_causal=causal).transpose(1, 2).reshape(B, N, C).numpy()


def _calls(monkeypatch, name: str) -> list:
    """A list that gains an entry each time the attention module's function `name` is called (which still runs)."""
    calls, original = [], getattr(attention_module, name)
    monkeypatch.setattr(attention_module, name, lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.fixture(params=["mkl", "numpy"])
def sgemm_path(request, monkeypatch):
    """The blocked attention's products through MKL (where mlx_sd loaded it) and through numpy's OpenBLAS."""
    if request.param == "mkl" and cpu_blas._mkl is None:
        pytest.skip(f"MKL is not loaded here (MLX's BLAS: {backend.blas})")
    if request.param == "numpy":
        monkeypatch.setattr(cpu_blas, "_mkl", None)
    return request.param


@pytest.mark.parametrize(
    "B,N,M,C,heads",
    [(2, 1024, 1024, 320, 8), (2, 1024, 77, 320, 8), (1, 1500, 1500, 512, 1), (2, 256, 256, 256, 4)],
)
def test_blocked_attention_matches_torch(B, N, M, C, heads, sgemm_path, row_kernels):
    """Both products' paths, and the weights' exp2 by numba's kernel (cpu_kernels.exp2) or numpy's."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, n, C), dtype=np.float32) for n in (N, M, M))
    assert backend.attention_kernel(mx.float32) == "blocked"
    got = attention(mx.array(q), mx.array(k), mx.array(v), heads)
    assert_close(got, _reference_attention(q, k, v, heads), 2e-6, "blocked attention")


@pytest.mark.parametrize("N,M,path", [(9216, 36, "blocked"), (1024, 36, "blocked"), (1024, 36, "fused")])
def test_attention_with_wider_values_and_its_own_scale(monkeypatch, N, M, path, sgemm_path):
    """RGT's recursive attention: values twice as wide as the keys, a scale that is not 1 / sqrt(d); on the blocked
    path by query blocks and as small heads, and on MLX's kernel."""
    if path == "fused":
        monkeypatch.setattr(backend, "attention_kernel", lambda dtype: "fused")
    rng = np.random.default_rng(3)
    (q, k), v = (rng.standard_normal((1, n, 90), dtype=np.float32) for n in (N, M)), rng.standard_normal((1, M, 180))
    t = [torch.from_numpy(x).reshape(1, -1, 6, x.shape[2] // 6).transpose(1, 2) for x in (q, k, v.astype(np.float32))]
    expected = F.scaled_dot_product_attention(*t, scale=0.3).transpose(1, 2).reshape(1, N, 180).numpy()
    got = attention(mx.array(q), mx.array(k), mx.array(v.astype(np.float32)), 6, scale=0.3)
    assert_close(got, expected, 2e-6, f"attention with wider values ({path})")


@pytest.mark.parametrize("N", [600, 400])
def test_blocked_attention_query_blocks_and_overflow_fallback(monkeypatch, sgemm_path, N):
    """Tiny score blocks force many query blocks; logits beyond float32 exp's range force the exact fallback. With
    400 tokens (160,000 scores per head) the heads run together (`_small_heads`), with 600 in query blocks."""
    rng = np.random.default_rng(1)
    B, C, heads = 1, 64, 2
    q, k, v = (rng.standard_normal((B, N, C), dtype=np.float32) for _ in range(3))
    # Queries and one key all near 6 * ones: that key's logits are ~36 * 32 / sqrt(32) = 204, far beyond float32
    # exp's range (88), unshifted.
    q = 6 + 0.1 * q
    k[0, 7] = 6
    monkeypatch.setattr(attention_module, "SCORE_BLOCK_BYTES", 128 * N * 4)  # 128-row blocks
    fallbacks = _calls(monkeypatch, "_exact_head")
    small = _calls(monkeypatch, "_small_heads")
    got = attention(mx.array(q), mx.array(k), mx.array(v), heads)
    assert fallbacks, "the overflow fallback was not exercised"
    assert bool(small) == (N * N <= attention_module.SMALL_HEAD_SCORES)
    assert_close(got, _reference_attention(q, k, v, heads), 2e-6, "blocked attention with fallback")


@pytest.mark.parametrize("N", [300, 600])
def test_attention_underflow_fallback(monkeypatch, sgemm_path, N):
    """Logits of about -200 in every row of one head underflow the unshifted exp to 0 and must be redone with the
    exact row max: heads of 300 tokens together (`_small_heads`), of 600 in 128-row query blocks."""
    monkeypatch.setattr(attention_module, "SCORE_BLOCK_BYTES", 128 * N * 4)
    fallbacks = _calls(monkeypatch, "_exact_head")
    rng = np.random.default_rng(8)
    B, C, heads = 2, 64, 2  # at least 360,000 scores: the blocked path
    q, k, v = (rng.standard_normal((B, N, C), dtype=np.float32) for _ in range(3))
    q[:, :, :32] = -6 + 0.1 * q[:, :, :32]  # head 0: q near -6 * ones, k near 6 * ones: logits ~ -204
    k[:, :, :32] = 6 + 0.1 * k[:, :, :32]
    got = attention(mx.array(q), mx.array(k), mx.array(v), heads)
    assert fallbacks, "the underflow fallback was not exercised"
    exact = _reference_attention(*(x.astype(np.float64) for x in (q, k, v)), heads)
    # logits of 200 carry float32 rounding of ~1e-5 into the weights, in torch's kernel as in ours
    assert relative_error(got, exact) <= 2 * relative_error(_reference_attention(q, k, v, heads), exact)


@pytest.mark.parametrize("C,heads", [(768, 12), (1280, 20)])  # CLIP-L, OpenCLIP-G
def test_causal_text_attention_takes_the_small_heads_and_matches_torch(monkeypatch, sgemm_path, C, heads):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 77, C), dtype=np.float32) for _ in range(3))
    small = _calls(monkeypatch, "_small_heads")
    got = attention(mx.array(q), mx.array(k), mx.array(v), heads, "causal")
    assert small, "the causal text attention did not run on the blocked path"
    assert_close(got, _reference_attention(q, k, v, heads, causal=True), 2e-6, "causal attention")


def test_causal_attention_overflow_fallback_keeps_the_mask(monkeypatch, sgemm_path):
    """Key 7's logits (~204, unshifted beyond float32 exp's range) overflow for the queries that see it (7 and on);
    the exact redo must still hide it from queries 0-6."""
    rng = np.random.default_rng(4)
    B, N, C, heads = 2, 77, 256, 8
    q, k, v = (rng.standard_normal((B, N, C), dtype=np.float32) for _ in range(3))
    q = 6 + 0.1 * q
    k[:, 7] = 6
    fallbacks = _calls(monkeypatch, "_exact_head")
    got = attention(mx.array(q), mx.array(k), mx.array(v), heads, "causal")
    assert fallbacks, "the overflow fallback was not exercised"
    assert_close(got, _reference_attention(q, k, v, heads, causal=True), 2e-6, "causal attention with fallback")


def _reference_window_attention(qkv, heads, bias, mask, kv=None, scale=None):
    """softmax(q k^T / sqrt(d) + bias + mask[w % nW]) v by torch, in float64 (bias None: none; `scale` for 1 /
    sqrt(d)); q, k, v from the fused projection, or q = qkv and k, v from `kv` (Bw, M, 2C)."""
    Bw, N, C3 = qkv.shape
    qkv, kv = torch.from_numpy(qkv).double(), None if kv is None else torch.from_numpy(kv).double()
    q, k, v = qkv.chunk(3, dim=-1) if kv is None else (qkv, *kv.chunk(2, dim=-1))
    q, k, v = (x.reshape(Bw, x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
    extra = torch.zeros((Bw, heads, N, k.shape[2]), dtype=torch.float64)
    if bias is not None:
        extra = extra + torch.from_numpy(bias).double()[None]
    if mask is not None:
        extra = extra + torch.from_numpy(mask).double().repeat(Bw // len(mask), 1, 1)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=extra, scale=scale)
    return out.transpose(1, 2).reshape(Bw, N, -1).numpy()


@pytest.mark.parametrize("path", ["blocked", "fused"])
@pytest.mark.parametrize("case", ["masked", "biased", "plain"])
def test_window_attention_matches_torch(monkeypatch, sgemm_path, path, case):
    """Swin's window attention (SwinIR): q, k and v read from the fused projection, the heads' relative position
    bias and the shifted windows' masks (-100 between regions, window w of each of 2 images taking mask[w % nW])
    added; blocked in runs of windows that must not cross images (tiny score blocks force runs of 3 of 4 windows).
    "plain": no bias, no mask and a scale of its own that takes the logits beyond float32 exp's range (ATD's category
    groups: `unbounded`, the row max subtracted first, without redoing any window)."""
    rng = np.random.default_rng(5)
    images, nW, N, C, heads = 2, 4, 49, 60, 3  # 7x7 windows, SwinIR's JPEG models'
    qkv = rng.standard_normal((images * nW, N, 3 * C), dtype=np.float32)
    bias = rng.standard_normal((heads, N, N), dtype=np.float32) if case != "plain" else None
    mask = np.where(rng.random((nW, N, N)) < 0.3, -100.0, 0.0).astype(np.float32) if case == "masked" else None
    scale = 20.0 if case == "plain" else None
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    monkeypatch.setattr(attention_module, "SCORE_BLOCK_BYTES", 3 * N * N * 4)
    blocked = _calls(monkeypatch, "_windows_blocked")
    if path == "fused":
        monkeypatch.setattr(backend, "attention_kernel", lambda dtype: "fused")
    q, k, v = mx.split(mx.array(qkv), 3, axis=-1)
    bias_mx, mask_mx = (None if x is None else mx.array(x) for x in (bias, mask))
    redone = _calls(monkeypatch, "_exact_head")
    got = attention_module.window_attention(q, k, v, heads, bias_mx, mask_mx, scale, unbounded=case == "plain")
    assert bool(blocked) == (path == "blocked")
    assert not (case == "plain" and redone)
    expected = _reference_window_attention(qkv, heads, bias, mask, scale=scale)
    tolerance = 2e-5 if case == "plain" else 2e-6  # float32 logits of ~300 there: rounding ~2e-5 of a logit
    assert_close(got, expected, tolerance, f"{path} window attention")


@pytest.mark.parametrize("path", ["blocked", "fused"])
def test_overlapping_window_attention_matches_torch(monkeypatch, sgemm_path, path):
    """HAT's overlapping cross-attention: 4x4 query windows against 6x6 key/value windows (N != M), the bias
    (heads, N, M) added; the keys and values read in place from one (Bw, M, 2C) array."""
    rng = np.random.default_rng(7)
    Bw, N, M, C, heads = 6, 16, 36, 24, 2
    q = rng.standard_normal((Bw, N, C), dtype=np.float32)
    kv = rng.standard_normal((Bw, M, 2 * C), dtype=np.float32)
    bias = rng.standard_normal((heads, N, M), dtype=np.float32)
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    blocked = _calls(monkeypatch, "_windows_blocked")
    if path == "fused":
        monkeypatch.setattr(backend, "attention_kernel", lambda dtype: "fused")
    k, v = mx.split(mx.array(kv), 2, axis=-1)
    got = attention_module.window_attention(mx.array(q), k, v, heads, mx.array(bias))
    assert bool(blocked) == (path == "blocked")
    assert_close(got, _reference_window_attention(q, heads, bias, None, kv), 2e-6, f"{path} overlapping windows")


def test_window_attention_overflow_redo_keeps_bias_and_mask(monkeypatch, sgemm_path):
    """Logits beyond float32 exp's range (unshifted) in one window: redone with the exact row max, bias and mask on."""
    rng = np.random.default_rng(6)
    nW, N, C, heads = 4, 64, 64, 2
    qkv = rng.standard_normal((nW, N, 3 * C), dtype=np.float32)
    qkv[1, :, :C] = 6 + 0.1 * qkv[1, :, :C]  # window 1: queries and key 5 near 6 * ones, logits ~204
    qkv[1, 5, C : 2 * C] = 6
    bias = rng.standard_normal((heads, N, N), dtype=np.float32)
    mask = np.where(rng.random((nW, N, N)) < 0.3, -100.0, 0.0).astype(np.float32)
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    fallbacks = _calls(monkeypatch, "_exact_head")
    got = attention_module.window_attention(*mx.split(mx.array(qkv), 3, axis=-1), heads, mx.array(bias), mx.array(mask))
    assert fallbacks, "the overflow fallback was not exercised"
    exact = _reference_window_attention(qkv, heads, bias, mask)
    assert_close(got, exact, 2e-5, "window attention with fallback")  # logits of 200: float32 rounding ~1e-5


def test_fused_attention_blocks_match_unblocked(monkeypatch):
    """The fused path's query blocking (used on GPUs at large sizes) changes nothing but memory."""
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 300, 64), dtype=np.float32)) for _ in range(3))
    whole = attention_module._fused(q, k, v, 2, None, 32**-0.5)
    monkeypatch.setattr(attention_module, "FUSED_BLOCK_BYTES", 4 * 64 * 300 * 4)
    assert relative_error(attention_module._fused(q, k, v, 2, None, 32**-0.5), whole) < 1e-6


_GRID = np.concatenate([np.linspace(-12, 12, 200_001), np.geomspace(1e-8, 1e-2, 1001)]).astype(np.float32)


@pytest.mark.parametrize(
    "ours,ref",
    [
        (layers.silu, F.silu),
        (layers.gelu, F.gelu),
        (layers.quick_gelu, lambda x: x * torch.sigmoid(1.702 * x)),
        (lambda x: layers.geglu(x[::-1] * 0.5, x), lambda x: x.flip(0) * 0.5 * F.gelu(x)),
        (layers.sigmoid, torch.sigmoid),
        (layers.mish, F.mish),
        (layers.tanh, torch.tanh),
    ],
    ids=["silu", "gelu", "quick_gelu", "geglu", "sigmoid", "mish", "tanh"],
)
def test_activations_match_torch(ours, ref):
    """Absolute error against torch's float32 kernels at float32 rounding level over [-12, 12] and tiny inputs."""
    got = np.array(ours(mx.array(_GRID)))
    expected = ref(torch.from_numpy(_GRID)).numpy()
    scale = np.maximum(np.abs(_GRID), 1.0)  # ulps of the input's size: x * sigmoid(x) ~ x for large x
    assert np.max(np.abs(got - expected) / scale) < 1e-6
    tiny = np.abs(_GRID) < 1e-2  # relative accuracy where values are small
    assert np.max(np.abs(got - expected)[tiny] / np.maximum(np.abs(expected[tiny]), 1e-30)) < 1e-5


def test_mish_kernel_over_its_whole_range():
    """PLKSR's Mish (numba's kernel here) against torch in float64 from -87 (where e^x leaves the float32 normals)
    through torch's softplus threshold (20) to 100, NaN kept; a (B, H, W, C) map split across threads. Relative
    error 1.5e-6 from -20 up; below, e^x's argument x log2(e) rounded to float32 costs up to ~4e-6 relative on values
    under 1e-7, so the check there is absolute."""
    x = np.concatenate([np.linspace(-87, 100, 400_001, dtype=np.float32), [np.nan]]).astype(np.float32)
    got = np.array(layers.mish(mx.array(x)))
    assert np.isnan(got[-1])
    got = got[:-1]
    expected = F.mish(torch.from_numpy(x[:-1]).double()).numpy()
    error = np.abs(got - expected)
    upper = x[:-1] >= -20
    assert np.max(error[upper] / np.maximum(np.abs(expected[upper]), 1e-37)) < 1.5e-6  # mish(0) = 0 exactly
    assert np.max(error[~upper]) < 1e-13
    image = np.random.default_rng(8).standard_normal((2, 40, 30, 16)).astype(np.float32) * 4
    expected = F.mish(torch.from_numpy(image).double()).numpy()
    assert np.max(np.abs(np.array(layers.mish(mx.array(image))) - expected) / (np.abs(expected) + 1e-30)) < 1.5e-6


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.float16, 2e-3)])
def test_group_norm_matches_torch(monkeypatch, row_kernels, silu, dtype, tol):
    """Both CPU paths; numba's statistics in uneven row blocks (7 rows) over three workers' uneven row ranges."""
    monkeypatch.setattr(cpu_kernels, "GROUP_NORM_BLOCK_BYTES", 4 * 64 * 7)
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: 3)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 12, 10, 64)) * 3 + 5).astype(np.float32)
    norm = layers.GroupNorm(32, 64, eps=1e-6)
    norm.weight = mx.array(rng.standard_normal(64).astype(np.float32)).astype(dtype)
    norm.bias = mx.array(rng.standard_normal(64).astype(np.float32)).astype(dtype)
    got = norm(mx.array(x).astype(dtype), silu=silu)
    assert got.dtype == dtype
    t = F.group_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        32,
        torch.from_numpy(np.array(norm.weight.astype(mx.float32))),
        torch.from_numpy(np.array(norm.bias.astype(mx.float32))),
        eps=1e-6,
    )
    expected = (F.silu(t) if silu else t).permute(0, 2, 3, 1).numpy()
    assert_close(got, expected, tol, "group norm")


def test_group_norm_large_groups_far_from_zero(row_kernels):
    """A VAE-sized group (a million values per group) whose mean is 100x its spread: the variance must come from
    deviations (a one-pass E[x^2] - E[x]^2 loses it), against torch in float64."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1, 256, 256, 64)) + 100).astype(np.float32)  # groups of 2 channels: 131,072 values
    norm = layers.GroupNorm(32, 64, eps=1e-6)
    norm.update({k: mx.array(rng.standard_normal(64).astype(np.float32)) for k in ("weight", "bias")})
    got = norm(mx.array(x), silu=True)
    w, b = (torch.from_numpy(np.array(norm[k])).double() for k in ("weight", "bias"))
    t = F.group_norm(torch.from_numpy(x).double().permute(0, 3, 1, 2), 32, w, b, eps=1e-6)
    assert_close(got, F.silu(t).permute(0, 2, 3, 1).numpy(), 2e-5, "large-group norm")


@pytest.fixture(params=["numba", "mlx"])
def row_kernels(request, monkeypatch):
    """LayerNorm and the GEGLU gate by numba's kernels (cpu_kernels) and by MLX's ops in row blocks on streams."""
    if request.param == "numba" and not backend._numba_installed():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(backend, "row_kernels", lambda dtype: request.param if dtype == mx.float32 else "mlx")
    return request.param


@pytest.mark.parametrize("blocks", [2, 3])
def test_row_blocks_match_torch(monkeypatch, row_kernels, blocks):
    """LayerNorm and the GEGLU feed-forward computed in row blocks, on several CPU streams or worker threads (uneven
    blocks included), against torch; the thresholds are lowered so that a small input is split."""
    from mlx_sd.models.unet import FeedForward

    monkeypatch.setattr(layers, "ROW_BLOCK_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "row_block_streams", lambda: [mx.new_stream(mx.cpu) for _ in range(blocks)])
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: blocks)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 77, 64)).astype(np.float32)  # 154 rows: blocks of 77 or 51/51/52
    norm = layers.LayerNorm(64)
    norm.update({k: mx.array(rng.standard_normal(64).astype(np.float32)) for k in ("weight", "bias")})
    ff = FeedForward(64)
    ff.update(
        {
            "net": [
                {
                    "proj": {
                        "weight": mx.array(0.2 * rng.standard_normal((512, 64), dtype=np.float32)),
                        "bias": mx.array(rng.standard_normal(512, dtype=np.float32)),
                    }
                },
                {},
                {
                    "weight": mx.array(0.1 * rng.standard_normal((64, 256), dtype=np.float32)),
                    "bias": mx.array(rng.standard_normal(64, dtype=np.float32)),
                },
            ]
        }
    )
    t = torch.from_numpy(x)
    ln = F.layer_norm(t, (64,), *(torch.from_numpy(np.array(norm[k])) for k in ("weight", "bias")))
    assert_close(norm(mx.array(x)), ln.numpy(), 1e-6, "row-block layer norm")
    p = {k: torch.from_numpy(np.array(v)) for k, v in ff.net[0].proj.items()}
    value, gate = F.linear(t, p["weight"], p["bias"]).chunk(2, dim=-1)
    out = F.linear(
        value * F.gelu(gate), torch.from_numpy(np.array(ff.net[2].weight)), torch.from_numpy(np.array(ff.net[2].bias))
    )
    assert_close(ff(mx.array(x)), out.numpy(), 2e-6, "row-block GEGLU feed-forward")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_bias_and_residual_matches_torch(monkeypatch, row_kernels, bias):
    """`layers.linear` and `layers.linear_plus` (the product, then bias and residual added in place by numba's
    kernel, or MLX's addmm), with a residual shaped as pixels against token rows, in uneven row blocks."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: 3)
    rng = np.random.default_rng(9)
    layer = nn.Linear(48, 40, bias=bias)
    layer.update({k: mx.array(rng.standard_normal(v.shape).astype(np.float32)) for k, v in layer.items()})
    x = rng.standard_normal((2, 35, 48)).astype(np.float32)  # 70 rows: blocks of 23 / 23 / 24
    residual = rng.standard_normal((2, 5, 7, 40)).astype(np.float32)
    t = F.linear(torch.from_numpy(x), *(torch.from_numpy(np.array(layer[k])) for k in layer))
    assert_close(layers.linear(layer, mx.array(x)), t.numpy(), 1e-6, "linear")
    got = layers.linear_plus(layer, mx.array(x), mx.array(residual))
    assert got.shape == residual.shape
    assert_close(got, (t.reshape(residual.shape) + torch.from_numpy(residual)).numpy(), 1e-6, "linear_plus")


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_linear_with_activation_matches_torch(monkeypatch, row_kernels, activation):
    """`layers.linear(layer, x, activation)`: numba's bias kernel applies GELU (OpenCLIP, SwinIR) or CLIP's
    x * sigmoid(1.702 x) in the same pass; MLX's path the layers' own. Inputs across both functions' whole range."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: 3)
    rng = np.random.default_rng(10)
    layer = nn.Linear(48, 40)
    layer.update({k: mx.array(4 * rng.standard_normal(v.shape).astype(np.float32)) for k, v in layer.items()})
    x = rng.standard_normal((2, 35, 48)).astype(np.float32)  # pre-activations up to ~+-100
    t = F.linear(torch.from_numpy(x), *(torch.from_numpy(np.array(layer[k])) for k in layer))
    t = F.gelu(t) if activation == "gelu" else t * torch.sigmoid(1.702 * t)
    assert_close(layers.linear(layer, mx.array(x), activation), t.numpy(), 2e-6, f"linear + {activation}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel", [3, 7])
def test_depthwise_and_grouped_convs_match_torch(monkeypatch, row_kernels, bias, kernel):
    """3x3 and 7x7 depthwise convolutions (DAT's, MoSR's) by numba's kernel (cpu_kernels.depthwise: rows split
    unevenly across three workers, batch 2, zero padding at every edge, kernels wider than the image) or MLX's grouped
    conv; other groupings by MLX's."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: 3)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 7, 5, 12)).astype(np.float32)
    for groups in (12, 3):
        conv = layers.Conv2d(12, 12, kernel, padding=kernel // 2, groups=groups, bias=bias)
        conv.weight = mx.array(rng.standard_normal(conv.weight.shape).astype(np.float32))  # no symmetric zero init
        w = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)
        b = torch.from_numpy(np.array(conv.bias)) if bias else None
        ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, b, padding=kernel // 2, groups=groups)
        assert_close(conv(mx.array(x)), ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"{kernel}x{kernel}, {groups} groups")


@pytest.mark.parametrize("kernel,dilation", [((1, 5), 1), ((5, 1), 1), ((1, 11), 1), ((7, 7), 3), ((3, 5), 2)])
def test_striped_and_dilated_depthwise_convs_match_torch(monkeypatch, row_kernels, kernel, dilation):
    """SeemoRe's and MoESR's 1 x k / k x 1 stripes and DITN's dilated 7x7 (cpu_kernels.depthwise with the padding
    that keeps the size), against torch; kernels reaching past every edge of a small image."""
    monkeypatch.setattr(cpu_kernels, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(backend, "cpu_threads", lambda: 3)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 9, 8, 6)).astype(np.float32)
    padding = (dilation * (kernel[0] // 2), dilation * (kernel[1] // 2))
    conv = layers.Conv2d(6, 6, kernel, padding=padding, groups=6, dilation=dilation)
    conv.weight = mx.array(rng.standard_normal(conv.weight.shape).astype(np.float32))
    conv.bias = mx.array(rng.standard_normal(6).astype(np.float32))
    w = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)
    ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, torch.from_numpy(np.array(conv.bias)), padding=padding,
                   dilation=dilation, groups=6)  # fmt: skip
    assert_close(conv(mx.array(x)), ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"{kernel} dilation {dilation}")


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 3), (5, 3, 2), (3, 2, 1), (3, 1, 1)])
def test_conv_transpose_matches_torch(kernel, stride, padding):
    """layers.conv_transpose (Real-CUGAN's and SCUNet's transposed convs): one product and shifted blocks, the kernel
    zero-padded to a multiple of the stride where it is not one (5 over 3), the padding cropped; odd sizes."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)
    w = rng.standard_normal((5, 4, kernel, kernel)).astype(np.float32)  # torch's (in, out, k, k)
    ref = F.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w), None, stride, padding)
    got = layers.conv_transpose(mx.array(x), mx.array(w.transpose(0, 2, 3, 1)), stride, padding)
    assert_close(got, ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"conv_transpose k{kernel} s{stride} p{padding}")


def test_exp2_kernel_matches_float64():
    """cpu_kernels.exp2 (the attention's weights): within 1 ulp of 2^x over float32's whole normal range, inf from 128
    up (the attention's overflow test relies on it), 0 below -126.5, NaN kept; rows of any length."""
    if not backend._numba_installed():
        pytest.skip("numba is not installed")
    x = np.concatenate([np.linspace(-126, 127.99, 400_003), [128, 200, np.inf, -127, -300, -np.inf, np.nan]])
    x = x.astype(np.float32)
    got = cpu_kernels.exp2(x.reshape(-1, 13).copy()).reshape(-1)
    exact = np.exp2(x[:-7].astype(np.float64))
    assert np.abs(got[:-7] / exact - 1).max() < 1.2e-7  # float32's ulp is 1.2e-7 at most (relative)
    np.testing.assert_array_equal(got[-7:-1], [np.inf, np.inf, np.inf, 0, 0, 0])
    assert np.isnan(got[-1])


def test_layer_norm_rows_far_from_zero_and_non_finite(row_kernels):
    """Rows with a large mean (the variance of deviations must not cancel), a constant row, and a NaN row (which
    stays NaN without touching the others), against torch in float64."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 320)).astype(np.float32)
    x[0] = x[0] * 1e-3 + 1e4
    x[1] = 7.0
    x[2, 5] = np.nan
    norm = layers.LayerNorm(320)
    norm.update({k: mx.array(rng.standard_normal(320).astype(np.float32)) for k in ("weight", "bias")})
    got = np.array(norm(mx.array(x)))
    w, b = (torch.from_numpy(np.array(norm[k])).double() for k in ("weight", "bias"))
    expected = F.layer_norm(torch.from_numpy(x).double(), (320,), w, b).numpy()
    torch32 = F.layer_norm(torch.from_numpy(x), (320,), w.float(), b.float()).numpy()
    assert np.isnan(got[2]).all() and np.isfinite(got[[0, 1, 3, 4, 5]]).all()
    # row 0: its deviations are 1e-3 of its mean; torch's own float32 kernel is off by 3.6e-2 there, ours by 2.8e-3
    assert np.abs(got[0] - expected[0]).max() <= np.abs(torch32[0] - expected[0]).max()
    assert np.abs(got[[1, 3, 4, 5]] - expected[[1, 3, 4, 5]]).max() < 1e-5


def test_cpu_kernels_compile_without_a_cache_location(monkeypatch):
    """Where numba finds no writable cache location it refuses `cache=True`; the kernels then compile uncached."""
    numba = pytest.importorskip("numba")
    njit = numba.njit

    def refusing(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", refusing)
    monkeypatch.setattr(cpu_kernels, "_built", None)  # build afresh, uncached
    x = np.random.default_rng(10).standard_normal((4, 16)).astype(np.float32)
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    got = cpu_kernels.layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)
    assert_close(got, F.layer_norm(torch.from_numpy(x), (16,)).numpy(), 1e-6, "uncached layer norm")


def test_cpu_kernels_warm_up_calls_each_kernel():
    """The warm-up a model load starts in the background (components.load_component) runs every kernel once."""
    pytest.importorskip("numba")
    cpu_kernels._call_each_kernel()


def test_numba_that_does_not_import_falls_back_with_a_warning(monkeypatch):
    """numba installed but failing at import (as it does with a numpy newer than it supports): MLX's ops run, and a
    warning names the fix."""
    if backend.importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    monkeypatch.delenv(backend.NUMBA_ENV, raising=False)
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "numba":
            raise ImportError("Numba needs NumPy 2.4 or less")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    backend._numba_installed.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="pip install -U numba"):
            assert backend.row_kernels(mx.float32) == "mlx"
    finally:
        backend._numba_installed.cache_clear()


def test_row_kernels_choice(monkeypatch):
    """numba's kernels run for float32 on a Linux CPU where numba is installed, unless MLX_SD_NUMBA=0."""
    monkeypatch.delenv(backend.NUMBA_ENV, raising=False)
    expected = "numba" if backend._numba_installed() and backend.sys.platform != "darwin" else "mlx"
    assert backend.row_kernels(mx.float32) == expected
    assert backend.row_kernels(mx.float16) == "mlx"
    monkeypatch.setenv(backend.NUMBA_ENV, "0")
    assert backend.row_kernels(mx.float32) == "mlx"


def test_conv_row_strips_match_torch(monkeypatch):
    """Large 3x3 convolutions run in row strips (bounded unfold buffer); uneven strips included."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 23, 9, 16)).astype(np.float32)
    conv = layers.Conv2d(16, 8, 3, padding=1)
    monkeypatch.setattr(layers, "CONV_UNFOLD_BYTES", 2 * 5 * 9 * 16 * 9 * 4)  # 5-row strips: 5 strips, last of 3
    got = conv(mx.array(x))
    w = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)
    ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, torch.from_numpy(np.array(conv.bias)), padding=1)
    assert_close(got, ref.permute(0, 2, 3, 1).numpy(), 1e-6, "strip conv")


@pytest.mark.parametrize("bias", [True, False])
def test_conv_taps_match_torch(monkeypatch, bias):
    """On CPU, 3x3 convolutions run as nine per-tap products over the padded input's rows (layers.conv3x3_taps):
    batch 2 (taps reading across the padding between images), a non-square image, and few output channels."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, 11, 16)).astype(np.float32)
    monkeypatch.setattr(layers, "TAPS_MIN_PIXELS", 1)
    monkeypatch.setattr(layers, "TAPS_MIN_CHANNELS", 1)
    monkeypatch.setattr(backend, "conv3x3_kernel", lambda dtype: "taps")
    for out_channels in (24, 3):
        conv = layers.Conv2d(16, out_channels, 3, padding=1, bias=bias)
        got = conv(mx.array(x))
        w = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)
        b = torch.from_numpy(np.array(conv.bias)) if bias else None
        ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, b, padding=1)
        assert_close(got, ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"tap conv to {out_channels} channels")


@pytest.mark.parametrize("path", ["mlx", "taps", "winograd"])
def test_valid_3x3_convs_take_the_fast_paths(monkeypatch, path):
    """Unpadded 3x3 convolutions (Real-CUGAN's) run as the same-padded ones with the border dropped, on every path
    (MLX's conv with padding 1, the per-tap products, Winograd), and equal torch's padding=0 convolution."""
    if path == "winograd" and backend.row_kernels(mx.float32) != "numba":
        pytest.skip("numba is not installed")
    for name in ("TAPS_MIN_PIXELS", "TAPS_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS", "WINOGRAD_MIN_WORK",
                 "WINOGRAD_MIN_CHANNELS"):  # fmt: skip
        monkeypatch.setattr(layers, name, 1)
    monkeypatch.setattr(backend, "conv3x3_kernel", lambda dtype: path)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 11, 14, 32)).astype(np.float32)
    conv = layers.Conv2d(32, 16, 3)  # padding 0
    ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2),
                   torch.from_numpy(np.array(conv.bias)))  # fmt: skip
    got = conv(mx.array(x))
    assert got.shape == (2, 9, 12, 16)
    assert_close(got, ref.permute(0, 2, 3, 1).numpy(), 1e-5 if path == "winograd" else 1e-6, f"valid conv, {path}")


def test_winograd_transforms_are_exact():
    """F(4, 3) from its points: A^T [(G g) * (B^T d)] is the 3-tap correlation of d by g, exactly (in fractions)."""
    from fractions import Fraction

    bt, g, at = winograd.transforms()
    assert all(v.denominator == 1 for row in bt for v in row)  # the input transform is exact in float32
    rng = np.random.default_rng(6)
    for _ in range(5):
        d = [Fraction(int(v)) for v in rng.integers(-9, 9, 6)]
        f = [Fraction(int(v)) for v in rng.integers(-9, 9, 3)]
        gf = [sum(gi * fi for gi, fi in zip(row, f, strict=True)) for row in g]
        bd = [sum(bi * di for bi, di in zip(row, d, strict=True)) for row in bt]
        y = [sum(ai * u * v for ai, u, v in zip(row, gf, bd, strict=True)) for row in at]
        assert y == [sum(f[k] * d[i + k] for k in range(3)) for i in range(4)]


@pytest.mark.parametrize("transforms", ["numba", "blas"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_winograd_matches_torch(monkeypatch, bias, transforms):
    """On CPU in float32, 3x3 convolutions run as Winograd F(4x4, 3x3) (models/winograd.py), its transforms as numba
    kernels or as BLAS products (MLX_SD_NUMBA=0): batch 2, sizes that are not multiples of the 4-pixel tile, strips
    of tile rows (uneven, the last shorter), many and few outputs. Its rounding error is ~7x a direct convolution's,
    so it is measured against float64 and bounded relative to torch's float32 error."""
    if transforms == "numba" and backend.row_kernels(mx.float32) != "numba":
        pytest.skip("numba is not installed")
    if transforms == "blas":
        monkeypatch.setenv("MLX_SD_NUMBA", "0")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 13, 18, 96)).astype(np.float32)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_WORK", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
    calls = []
    monkeypatch.setattr(layers, "conv3x3_winograd", lambda *args: calls.append(1) or winograd.conv3x3_winograd(*args))
    assert backend.conv3x3_kernel(mx.float32) == "winograd"
    for block_bytes, out_channels in ((2**30, 80), (36 * 2 * 5 * 96 * 4 * 3, 64), (2**30, 3)):  # 3 + 1 tile rows
        monkeypatch.setattr(winograd, "BLOCK_BYTES", block_bytes)
        conv = layers.Conv2d(96, out_channels, 3, padding=1, bias=bias)
        conv.weight = conv.weight * 3  # unit-variance outputs
        got = np.array(conv(mx.array(x)))
        w = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2)
        b = torch.from_numpy(np.array(conv.bias)) if bias else None
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        exact = F.conv2d(xt.double(), w.double(), None if b is None else b.double(), padding=1)
        direct = F.conv2d(xt, w, b, padding=1).permute(0, 2, 3, 1).numpy()
        exact = exact.permute(0, 2, 3, 1).numpy()
        ours_rms, torch_rms = (float(np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))) for y in (got, direct))
        assert ours_rms < max(10 * torch_rms, 1e-6), (ours_rms, torch_rms)
        err = assert_close(got, exact, 1e-5, f"winograd conv to {out_channels} channels")
        print(f"winograd ({transforms}): max rel {err:.1e}, rms {ours_rms:.1e} (torch float32: {torch_rms:.1e})")
    assert len(calls) == 3


def test_winograd_kernels_apply_the_transforms(monkeypatch):
    """The numba kernels' written-out transforms are transforms()'s matrices: each input pixel of a tile lands in the
    transform domain as kron(B^T, B^T)'s column, each transform-domain element leaves as kron(A^T, A^T)'s column."""
    if backend.row_kernels(mx.float32) != "numba":
        pytest.skip("numba is not installed")
    from mlx_sd import cpu_kernels

    kernels = cpu_kernels._kernels()
    bt, _, at = (np.array(m, np.float64) for m in winograd.transforms())
    for e in range(36):  # pixel (e // 6 - 1, e % 6 - 1) of tile (0, 0); the row and column -1 are the zero padding
        r, s = divmod(e, 6)
        if r == 0 or s == 0:
            continue
        x = np.zeros((1, 8, 8, 2), np.float32)
        x[0, r - 1, s - 1] = 1
        v = np.zeros((36, 4, 2), np.float32)
        kernels.winograd_tiles(x, 0, 0, 2, 0, 2, v)
        np.testing.assert_array_equal(v[:, 0, 0], np.kron(bt, bt)[:, e])
        m = np.zeros((36, 4, 2), np.float32)
        m[e, 3] = 1
        y = np.zeros((1, 7, 7, 2), np.float32)  # tile (1, 1) is cropped to 3 x 3
        kernels.winograd_untile(m, np.zeros(2, np.float32), 0, 0, 2, 0, 2, y)
        np.testing.assert_array_equal(y[0, 4:, 4:, 1], np.kron(at, at)[:, e].reshape(4, 4)[:3, :3])


def test_conv_kernel_choice(monkeypatch):
    """Winograd only in float32 on CPU; MLX_SD_WINOGRAD=0 keeps the per-tap products."""
    assert backend.conv3x3_kernel(mx.float16) == "taps"
    monkeypatch.setenv("MLX_SD_WINOGRAD", "0")
    assert backend.conv3x3_kernel(mx.float32) == "taps"
