"""Linear regression with MSE, backpropagated with explicit Jacobian matrices.

The model is ŷ = w x + b for one feature, the loss J = (1/N) Σ (y⁽ⁱ⁾ − ŷ⁽ⁱ⁾)². The chain
rule, in numerator layout, builds

    ∂J/∂w = ∂J/∂J₀ · ∂J₀/∂ŷ · ∂ŷ/∂w        (1 x N) (N x N) (N x 1)
    ∂J/∂b = ∂J/∂J₀ · ∂J₀/∂ŷ · ∂ŷ/∂b

where J₀ is the vector of per-sample squared errors. This script prints those matrices
for a tiny data set, multiplies them, and checks the products against the lecture's
formulas −(2/N) Σ x⁽ⁱ⁾(y⁽ⁱ⁾ − ŷ⁽ⁱ⁾) and −(2/N) Σ (y⁽ⁱ⁾ − ŷ⁽ⁱ⁾), against what the fused
kernels `mse` + `linear_vjp` return, and against central finite differences. Then it
repeats the comparison on a larger data set, where the N x N matrix is already the
largest object in the computation: the reason the kernels never build it.

Run:  python examples/linear_regression_jacobians.py [--backend torch] [--n 1000]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import gradcore as gc


def show(name: str, a: Any) -> None:
    text = np.array2string(gc.to_numpy(a), precision=4, suppress_small=True)
    print(f"{name}  shape {tuple(a.shape)}:\n{text}\n")


def agree(label: str, got: Any, want: Any, *, rtol: float = 1e-10, atol: float = 1e-12) -> bool:
    g = np.asarray(gc.to_numpy(got), dtype=np.float64).ravel()
    w = np.asarray(gc.to_numpy(want), dtype=np.float64).ravel()
    ok = g.shape == w.shape and bool(np.allclose(g, w, rtol=rtol, atol=atol))
    err = float(np.max(np.abs(g - w))) if g.shape == w.shape else float("inf")
    print(f"  {label:<48} {'agree' if ok else 'DISAGREE'}  (max |difference| {err:.2e})")
    return ok


def derive(be: gc.Backend, n: int, seed: int, *, verbose: bool) -> bool:
    xp = be.xp
    rng = np.random.default_rng(seed)
    x_np = rng.uniform(-2.0, 2.0, size=n)
    y_np = 1.5 * x_np - 0.5 + 0.3 * rng.standard_normal(n)
    w, b = 0.8, 0.1  # the current parameters

    # The kernels work with a batch of rows: X is (N, 1), W is (1, 1), b is (1,).
    X = be.asarray(x_np[:, None])
    y = be.asarray(y_np[:, None])
    W = be.asarray(np.array([[w]]))
    bias = be.asarray(np.array([b]))
    yhat = gc.linear(X, W, bias)

    # The four Jacobians of the lecture.
    dJ_dJ0 = gc.mean_jacobian(yhat)  # (N,): 1/N each, a row
    dJ0_dyhat = gc.squared_error_jacobian(yhat, y)  # (N, N): diag(-2 (y - ŷ))
    _, dyhat_dW, dyhat_db = gc.linear_jacobians(X, W)  # (N, 1) each: x and ones
    dyhat_dw = xp.reshape(dyhat_dW, (n,))  # one weight: the column x
    dyhat_db = xp.reshape(dyhat_db, (n,))  # the column of ones

    dJ_dw = gc.chain(dJ_dJ0, dJ0_dyhat, dyhat_dw)  # () : scalar by scalar
    dJ_db = gc.chain(dJ_dJ0, dJ0_dyhat, dyhat_db)

    if verbose:
        print(f"x = {x_np.round(4)}\ny = {y_np.round(4)}\nw = {w}, b = {b}\n")
        show("ŷ = w x + b", xp.reshape(yhat, (n,)))
        show("∂J/∂J₀ = (1/N, ..., 1/N)", dJ_dJ0)
        show("∂J₀/∂ŷ = diag(-2 (y - ŷ))", dJ0_dyhat)
        show("∂ŷ/∂w = x", dyhat_dw)
        show("∂ŷ/∂b = 1", dyhat_db)
        show("∂J/∂w = ∂J/∂J₀ · ∂J₀/∂ŷ · ∂ŷ/∂w", dJ_dw)
        show("∂J/∂b = ∂J/∂J₀ · ∂J₀/∂ŷ · ∂ŷ/∂b", dJ_db)

    # The lecture's collapsed formulas, in float64 NumPy.
    resid = y_np - (w * x_np + b)
    formula_w = -(2.0 / n) * np.sum(x_np * resid)
    formula_b = -(2.0 / n) * np.sum(resid)

    # The fused kernels: the MSE gradient is one elementwise expression, and
    # linear_vjp sums it against x; no N x N matrix anywhere.
    _, g = gc.mse(yhat, y)
    _, gW, gb = gc.linear_vjp(g, X, W)

    # Finite differences of the whole loss in (w, b), as a user would check their own code.
    def loss_of(theta: Any) -> Any:
        Wt = xp.reshape(theta[0], (1, 1))
        bt = xp.reshape(theta[1], (1,))
        yt = xp.astype(y, theta.dtype)
        return gc.mse(gc.linear(xp.astype(X, theta.dtype), Wt, bt), yt)[0]

    theta = be.asarray(np.array([w, b]))
    check = gc.check_grad(loss_of, theta, xp.stack([dJ_dw, dJ_db]))

    print(f"N = {n}: the explicit chain ({n} x {n} matrix in the middle) against")
    ok = agree("-(2/N) Σ x(y - ŷ)  (the lecture's ∂J/∂w)", dJ_dw, formula_w)
    ok &= agree("-(2/N) Σ (y - ŷ)   (the lecture's ∂J/∂b)", dJ_db, formula_b)
    ok &= agree("mse + linear_vjp: dW", gW, dJ_dw)
    ok &= agree("mse + linear_vjp: db", gb, dJ_db)
    print(
        f"  {'central differences (check_grad)':<48} "
        f"{'agree' if check.ok else 'DISAGREE'}  (worst relative error {check.rel_error:.2e})"
    )
    return ok and check.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", help="array library (default numpy)")
    parser.add_argument("--n", type=int, default=1000, help="size of the large case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # the comparisons are in float64
    be = gc.backend(args.backend)
    print(f"backend: {be}\n")
    ok = derive(be, 4, args.seed, verbose=True)
    print()
    ok &= derive(be, args.n, args.seed + 1, verbose=False)
    print("\nall agree" if ok else "\nSOME DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
