"""Softmax regression with cross-entropy, backpropagated with explicit Jacobian matrices.

The model is L = X W + b (logits, N x K), Ŷ = softmax(L) row by row, and the loss
J = (1/N) Σ J₀⁽ⁱ⁾ with J₀⁽ⁱ⁾ = −Σₖ y⁽ⁱ⁾ₖ log ŷ⁽ⁱ⁾ₖ. Flattening the N x K matrices row by row,
the chain rule in numerator layout reads

    ∂J/∂L = ∂J/∂J₀ · ∂J₀/∂Ŷ · ∂Ŷ/∂L        (1 x N) (N x NK) (NK x NK)

where ∂Ŷ/∂L is block diagonal with one block diag(ŷ) − ŷŷᵀ per row and ∂J₀/∂Ŷ holds
−y/ŷ in each row's columns. Because each target row sums to one, the product collapses
to ∂J/∂L = −(1/N)(Y − Ŷ): one elementwise expression, which is what the fused kernel
`softmax_cross_entropy` computes in a single pass. This script prints the matrices for
a tiny case, continues the chain to W and b through the linear layer, and checks
everything against the kernels and finite differences, then on a larger case.

Run:  python examples/softmax_regression_jacobians.py [--backend torch] [--n 64 --k 10]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import gradcore as gc


def show(name: str, a: Any) -> None:
    text = np.array2string(gc.to_numpy(a), precision=4, suppress_small=True, max_line_width=120)
    print(f"{name}  shape {tuple(a.shape)}:\n{text}\n")


def agree(label: str, got: Any, want: Any, *, rtol: float = 1e-10, atol: float = 1e-12) -> bool:
    g = np.asarray(gc.to_numpy(got), dtype=np.float64).ravel()
    w = np.asarray(gc.to_numpy(want), dtype=np.float64).ravel()
    ok = g.shape == w.shape and bool(np.allclose(g, w, rtol=rtol, atol=atol))
    err = float(np.max(np.abs(g - w))) if g.shape == w.shape else float("inf")
    print(f"  {label:<44} {'agree' if ok else 'DISAGREE'}  (max |difference| {err:.2e})")
    return ok


def derive(be: gc.Backend, n: int, k: int, d: int, seed: int, *, verbose: bool) -> bool:
    xp = be.xp
    rng = np.random.default_rng(seed)
    X = be.asarray(rng.standard_normal((n, d)))
    W = be.asarray(0.5 * rng.standard_normal((d, k)))
    bias = be.asarray(0.1 * rng.standard_normal(k))
    labels = be.asarray(rng.integers(0, k, size=n))
    # One-hot targets with standard functions only: compare labels with 0..K-1.
    Y = xp.astype(
        xp.reshape(labels, (n, 1)) == xp.reshape(xp.arange(k, device=be.device), (1, k)),
        X.dtype,
    )

    L = gc.linear(X, W, bias)
    P = gc.softmax(L)

    dJ_dJ0 = gc.mean_jacobian(xp.zeros((n,), dtype=X.dtype, device=be.device))  # (N,)
    dJ0_dP = gc.cross_entropy_jacobian(P, Y)  # (N, N*K)
    dP_dL = gc.softmax_jacobian(P)  # (N*K, N*K)
    dJ_dL = xp.reshape(gc.chain(dJ_dJ0, dJ0_dP, dP_dL), (n, k))

    # One step further back, through the linear layer: ∂L/∂W and ∂L/∂b.
    _, dL_dW, dL_db = gc.linear_jacobians(X, W)  # (N*K, d*K) and (N*K, K)
    dJ_dW = xp.reshape(gc.chain(dJ_dJ0, dJ0_dP, dP_dL, dL_dW), (d, k))
    dJ_db = gc.chain(dJ_dJ0, dJ0_dP, dP_dL, dL_db)

    if verbose:
        show("logits L = X W + b", L)
        show("Ŷ = softmax(L)", P)
        show("Y (one-hot)", Y)
        show("∂J/∂J₀ = (1/N, ..., 1/N)", dJ_dJ0)
        show("∂J₀/∂Ŷ: -y/ŷ in each row's block", dJ0_dP)
        show("∂Ŷ/∂L: blocks diag(ŷ) - ŷŷᵀ", dP_dL)
        show("∂J/∂L = ∂J/∂J₀ · ∂J₀/∂Ŷ · ∂Ŷ/∂L (reshaped to N x K)", dJ_dL)
        # The collapse, one row at a time: -y/ŷ times diag(ŷ) - ŷŷᵀ is -(y - ŷ).
        p0, y0 = P[0, :], Y[0, :]
        row = gc.chain(-y0 / p0, gc.softmax_jacobian(p0))
        show("row 0 alone: (-y/ŷ) · (diag(ŷ) - ŷŷᵀ)", row)
        show("-(y - ŷ) for row 0", -(y0 - p0))

    # The lecture's collapsed formula and the fused kernels.
    formula = -(Y - P) / n
    _, g = gc.softmax_cross_entropy(L, labels)
    _, gW, gb = gc.linear_vjp(g, X, W)

    # Finite differences of the loss as a function of the logits.
    check = gc.check_grad(lambda u: gc.softmax_cross_entropy(u, labels)[0], L, g)

    print(f"N = {n}, K = {k}: the explicit chain ({n * k} x {n * k} softmax Jacobian) against")
    ok = agree("-(1/N)(Y - Ŷ)  (the lecture's ∂J/∂L)", dJ_dL, formula)
    ok &= agree("softmax_cross_entropy's gradient", g, dJ_dL)
    ok &= agree("linear_vjp: dW", gW, dJ_dW)
    ok &= agree("linear_vjp: db", gb, dJ_db)
    print(
        f"  {'central differences (check_grad)':<44} "
        f"{'agree' if check.ok else 'DISAGREE'}  (worst relative error {check.rel_error:.2e})"
    )
    return ok and check.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", help="array library (default numpy)")
    parser.add_argument("--n", type=int, default=64, help="samples in the large case")
    parser.add_argument("--k", type=int, default=10, help="classes in the large case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # the comparisons are in float64
    be = gc.backend(args.backend)
    print(f"backend: {be}\n")
    ok = derive(be, 2, 3, 2, args.seed, verbose=True)
    print()
    ok &= derive(be, args.n, args.k, 5, args.seed + 1, verbose=False)
    print("\nall agree" if ok else "\nSOME DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
