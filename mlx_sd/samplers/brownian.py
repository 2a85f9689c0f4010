"""Brownian-tree noise: A1111's noise for DPM++ SDE, 2M SDE and 3M SDE.

A1111 draws these samplers' noise from k-diffusion's `BrownianTreeNoiseSampler`: one Brownian motion W(sigma) per
image, seeded with the image's seed, and the noise of a step from sigma to sigma_next is the normalised increment
(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|). Since W is a fixed function of sigma, the noise of a
stretch of the schedule is the same whatever the step count, so images change gradually as steps are added
(independent draws per step give a different image for every step count).

`BrownianTree` is torchsde's `BrownianTree` (a `BrownianInterval` with `halfway_tree=True`, tol 1e-6, entropy
pool 24, no Levy area) computed the same way in numpy: a dyadic tree over [sigma_min, sigma_max] whose points are
rounded to 6 decimals; a node split at its midpoint gives its left child the Brownian-bridge value
mean + sqrt(var) * z, z drawn from a generator seeded by `numpy.random.SeedSequence(entropy, spawn_key=(key,
depth), pool_size=24)`, and its right child the rest. A1111 replaces torchsde's draw with `randn_local(seed,
shape)`: torch's CPU generator with "Random number generator source: CPU" and on Macs (MPS), which
`TorchCPUNoise` reproduces bit for bit, so in torch-cpu mode the increments equal A1111's in float32 arithmetic
(tests/test_brownian.py compares them with torchsde's). With MLX noise the tree is the same, its draws MLX's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

TOLERANCE_DIGITS = 6  # torchsde BrownianTree's tol=1e-6: tree points are rounded to 6 decimals
POOL_SIZE = 24  # torchsde BrownianTree's SeedSequence pool_size
CACHED_SPLITS = 64  # recent splits whose children are kept (a query reuses the path of the previous one)

Draw = Callable[[int, tuple[int, ...]], np.ndarray]  # (seed, shape) -> float32 standard normals, C order


def _round(t: float) -> float:
    return round(t, TOLERANCE_DIGITS)


class _Node:
    """An interval [start, end] of the tree; once split, its children meet at `midway`."""

    __slots__ = ("start", "end", "parent", "is_left", "midway", "left", "right", "key", "depth", "seed")

    def __init__(self, start: float, end: float, parent: _Node | None, is_left: bool):
        self.start, self.end = _round(start), _round(end)
        self.parent, self.is_left = parent, is_left
        self.midway = self.left = self.right = None


class BrownianTree:
    """One Brownian motion on [t0, t1] (W(t0) = 0), as torchsde's `BrownianTree(t0, w0, t1, entropy=entropy)`.

    Args:
        t0, t1: the interval, t0 < t1 (k-diffusion: the smallest nonzero and the largest sigma of the schedule).
        shape: the shape of W (one image, NCHW order: (C, H, W)).
        entropy: the seed (a non-negative integer).
        draw: `draw(seed, shape)`, the first standard-normal draw of a generator seeded with `seed`.
    """

    def __init__(self, t0: float, t1: float, shape: tuple[int, ...], entropy: int, draw: Draw):
        t0, t1 = float(t0), float(t1)
        if not t0 < t1:
            raise ValueError(f"a Brownian tree needs t0 < t1, got {t0} and {t1}")
        self.shape, self.entropy, self._draw = tuple(shape), int(entropy), draw
        self.root = _Node(t0, t1, None, False)
        self.root.key, self.root.depth = 0, 0
        w_seed = np.random.SeedSequence(self.entropy, pool_size=POOL_SIZE).generate_state(3)[0]
        self._root_w = self._draw(int(w_seed), self.shape) * np.float32(np.sqrt(t1 - t0))
        self._children: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # id(split node) -> W's

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """W(tb) - W(ta) for t0 <= ta <= tb <= t1 (float32, `shape`)."""
        ta, tb = float(ta), float(tb)
        ta = min(max(ta, self.root.start), self.root.end)
        tb = min(max(tb, self.root.start), self.root.end)
        if ta > tb:
            raise ValueError(f"Brownian tree query needs ta <= tb, got {ta} and {tb}")
        if ta == tb:
            return np.zeros(self.shape, np.float32)
        nodes: list[_Node] = []
        self._locate(self.root, _round(ta), _round(tb), nodes)
        w = self._increment(nodes[0])
        for node in nodes[1:]:
            w = w + self._increment(node)
        return w

    # torchsde `_Interval._loc_inner`: the intervals (existing or made by splitting) that make up [ta, tb].
    def _locate(self, node: _Node, ta: float, tb: float, out: list[_Node]) -> None:
        while True:
            if ta == node.start and tb == node.end:
                out.append(node)
                return
            if node.midway is None:
                self._split(node, tb if ta == node.start else ta)  # then look again at this node's children
            elif tb <= node.midway:
                node = node.left
            elif ta >= node.midway:
                node = node.right
            else:
                self._locate(node.left, ta, node.midway, out)
                ta, node = node.midway, node.right

    # `_Interval._split` with halfway_tree: split at midpoints until `point` is a split point.
    def _split(self, node: _Node, point: float) -> None:
        while True:
            half = 0.5 * (node.end + node.start)
            node.midway = _round(half)
            if node.parent is not None:
                node.key = 2 * node.parent.key + (0 if node.is_left else 1)
                node.depth = node.parent.depth + 1
            sequence = np.random.SeedSequence(self.entropy, spawn_key=(node.key, node.depth), pool_size=POOL_SIZE)
            node.seed = int(sequence.generate_state(4)[0])  # W's seed; H and Levy-area seeds are unused
            node.left = _Node(node.start, half, node, True)
            node.right = _Node(half, node.end, node, False)
            if point == node.midway:
                return
            node = node.right if point > node.midway else node.left

    def _increment(self, node: _Node) -> np.ndarray:
        """W over `node`, from its parent's by the Brownian bridge (torchsde, no Levy area), in float32."""
        path = []
        while node.parent is not None and id(node.parent) not in self._children:
            path.append(node)
            node = node.parent
        if node.parent is None:
            w = self._root_w
        else:
            pair = self._children[id(node.parent)]
            self._children.move_to_end(id(node.parent))
            w = pair[0] if node.is_left else pair[1]
        for child in reversed(path):
            parent = child.parent
            left_diff, right_diff = parent.midway - parent.start, parent.end - parent.midway
            h_reciprocal = 1 / (parent.end - parent.start)
            # torch multiplies a float32 tensor by a Python float in float32, one operation at a time
            mean = w * np.float32(left_diff) * np.float32(h_reciprocal)
            std = np.float32(np.sqrt(left_diff * right_diff * h_reciprocal))
            left = mean + std * self._draw(parent.seed, self.shape)
            pair = (left, w - left)
            self._children[id(parent)] = pair
            if len(self._children) > CACHED_SPLITS:
                self._children.popitem(last=False)
            w = pair[0] if child.is_left else pair[1]
        return w


class BrownianNoise:
    """k-diffusion's `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)` for NHWC latents: one tree per
    image (or one over the whole batch when given one source, as k-diffusion does for an int seed).

    Samplers call `noise.increment(x, sigma, sigma_next)` for the standard-normal noise of that step
    (`common.step_noise`). Sigmas are taken as float32, as k-diffusion holds them.

    Args:
        shape: the latents' shape (B, H, W, C).
        sigma_min, sigma_max: the tree's interval (A1111: the whole schedule's, img2img included).
        sources: one seeded noise source per image (`rng.MLXNoise`, `rng.TorchCPUNoise`), or one for the batch:
            a tree's entropy is its source's `seed`, its draws those of `source.reseeded(node_seed)`.
    """

    def __init__(self, shape: Sequence[int], sigma_min: float, sigma_max: float, sources: Sequence):
        b, h, w, c = shape
        self.batched = len(sources) > 1
        if self.batched and len(sources) != b:
            raise ValueError(f"{len(sources)} noise sources for a batch of {b}")
        tree_shape = (c, h, w) if self.batched else (b, c, h, w)
        t0, t1 = float(np.float32(sigma_min)), float(np.float32(sigma_max))
        self.trees = [BrownianTree(t0, t1, tree_shape, s.seed, _first_draw(s)) for s in sources]

    def increment(self, x: mx.array, sigma: float, sigma_next: float) -> mx.array:
        """(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), shaped and typed like x."""
        a, b = np.float32(sigma), np.float32(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = np.stack([tree(float(lo), float(hi)) for tree in self.trees])
        w = (w * np.float32(sign)) / np.sqrt(np.abs(b - a))
        w = w if self.batched else w[0]
        return mx.array(w.transpose(0, 2, 3, 1)).astype(x.dtype)


def _first_draw(source) -> Draw:
    return lambda seed, shape: np.asarray(source.reseeded(seed).normal(shape))


def brownian_noise(rng, shape: Sequence[int], sigma_min: float, sigma_max: float) -> BrownianNoise | None:
    """A1111's tree noise for latents of `shape` drawn from `rng`: a tree per source of a `rng.PerImageNoise`
    (image i's seed, as A1111 seeds image i's tree), else one tree for the batch. None when a source has no seed to
    grow a tree from (anything without `seed` and `reseeded`, such as a replay of given draws)."""
    sources = getattr(rng, "sources", [rng])
    if not all(hasattr(s, "seed") and hasattr(s, "reseeded") for s in sources):
        return None
    return BrownianNoise(shape, sigma_min, sigma_max, sources)
