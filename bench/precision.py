"""Cost and accuracy of float32 matmul precision on this backend (default vs "highest").

    .venv/bin/python bench/precision.py [--m 1024 --k 896 --n 4864 --reps 5]

actex's forward uses "highest" for float32 parameters (actex.model.ops.matmul_precision).
Prints GFLOP/s of a jitted float32 einsum at each precision and its relative error against
a float64 numpy product: on CPU both are float32 math; on TPU/GPU the default is not.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--k", type=int, default=896)
    parser.add_argument("--n", type=int, default=4864)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    a64, b64 = rng.standard_normal((args.m, args.k)), rng.standard_normal((args.k, args.n))
    exact = a64 @ b64
    a, b = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.float32)
    print(f"jax {jax.__version__} on {jax.default_backend()}; [{args.m},{args.k}]x[{args.k},{args.n}] float32")
    for precision in (None, jax.lax.Precision.HIGHEST):
        matmul = jax.jit(lambda x, y, p=precision: jnp.einsum("ik,kn->in", x, y, precision=p,
                                                              preferred_element_type=jnp.float32))
        out = matmul(a, b).block_until_ready()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        error = np.abs(np.asarray(out, np.float64) - exact).max() / np.abs(exact).max()
        flops = 2 * args.m * args.k * args.n / min(times) / 1e9
        print(f"precision {str(precision or 'default'):>9}: {flops:8.0f} GFLOP/s, max error / max |value| {error:.1e}")


if __name__ == "__main__":
    main()
