"""An independent NumPy implementation of the documented generator contract (docs/mezo.md), used
as the oracle for llmkernels.mezo.noise: Philox4x32-10 in uint64 arithmetic and Box-Muller in
float64 with NumPy's log/sin/cos."""
from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_MUL0, _MUL1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_WEYL0, _WEYL1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)


def splitmix64(seed: int) -> int:
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    c = [np.asarray(x, dtype=np.uint64) & _MASK32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = _MUL0 * c[0]
        p1 = _MUL1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK32]
        k0 = (k0 + _WEYL0) & _MASK32
        k1 = (k1 + _WEYL1) & _MASK32
    return c


def _box_muller(a, b):
    u = (2.0 * (a >> np.uint64(9)).astype(np.float64) + 1.0) / 2.0**24
    t = 2.0 * np.pi * ((b >> np.uint64(8)).astype(np.float64) + 0.5) / 2.0**24
    r = np.sqrt(-2.0 * np.log(u))
    return r * np.cos(t), r * np.sin(t)


def noise_float64(seed: int, tensor_index: int, numel: int) -> np.ndarray:
    """z(seed, tensor_index, j) for j < numel, in float64."""
    key = splitmix64(seed)
    groups = np.arange((numel + 3) // 4, dtype=np.uint64)
    x = philox4x32_10(groups & _MASK32, groups >> np.uint64(32), np.full_like(groups, tensor_index),
                      np.zeros_like(groups), key & 0xFFFFFFFF, key >> 32)
    z = np.empty((groups.size, 4))
    z[:, 0], z[:, 1] = _box_muller(x[0], x[1])
    z[:, 2], z[:, 3] = _box_muller(x[2], x[3])
    return z.reshape(-1)[:numel]
