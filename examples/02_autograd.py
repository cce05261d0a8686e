"""Lesson 2: autograd. Every row of the tutorials' "Autograd" table, PyTorch beside JAX.

PyTorch records operations on tensors that ``requires_grad`` and writes
gradients into ``.grad`` when ``backward()`` runs; JAX transforms a function
into the function that returns its gradient. Each section is tagged with the
row of ../shared/TUTORIAL_MAP.md it answers and, where torch is installed,
runs the PyTorch lines too and checks that the numbers agree.

Command:  python examples/02_autograd.py           (--quick: fewer regression steps)
Hardware: any CPU; about 5 s here (2 cores), most of it importing jax and torch.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import torch
except ImportError:  # the lesson runs without torch; it just skips the comparisons
    torch = None


def show(pytorch: str, jax_line: str, value: Any) -> None:
    """Prints one PyTorch line, its JAX counterpart and the JAX result."""
    print(f"  torch: {pytorch:<46} jax: {jax_line:<50} -> {value}")


def gradients() -> dict[str, Any]:
    # Tutorial row: `requires_grad`, `backward()`, `.grad`, `y = x**2` → grad `2x`
    print("\n== Gradients: `requires_grad`, `backward()`, `.grad`, `y = x**2` → grad `2x`")

    def f(x):
        return x**2

    g = jax.grad(f)(3.0)
    show("x = tensor(3., requires_grad=True)", "def f(x): return x ** 2", "")
    show("y = x**2; y.backward(); x.grad", "jax.grad(f)(3.0)", float(g))
    value, grad = jax.value_and_grad(f)(3.0)
    show("y.item(), x.grad", "jax.value_and_grad(f)(3.0)", (float(value), float(grad)))

    def loss_with_aux(w, x):
        pred = x @ w
        return jnp.mean(pred**2), pred  # (loss, auxiliary output)

    w, x = jnp.array([1.0, -2.0]), jnp.array([[1.0, 2.0], [3.0, 4.0]])
    (loss, pred), dw = jax.value_and_grad(loss_with_aux, has_aux=True)(w, x)
    show("loss.backward(); w.grad (keeping pred)", "value_and_grad(f, has_aux=True)(w, x)", dw.tolist())
    per_example = jax.vmap(jax.grad(f))(jnp.arange(4.0))  # many gradients at once, no loop
    show("(a loop of backward() calls)", "jax.vmap(jax.grad(f))(jnp.arange(4.))", per_example.tolist())
    result = {"grad_at_3": float(g), "per_example": per_example.tolist(), "dw": dw.tolist()}
    if torch is not None:
        tx = torch.tensor(3.0, requires_grad=True)
        (tx**2).backward()
        tw = torch.tensor([1.0, -2.0], requires_grad=True)
        torch.mean((torch.tensor(np.asarray(x)) @ tw) ** 2).backward()
        result["matches_torch"] = bool(
            np.isclose(float(tx.grad), float(g)) and np.allclose(tw.grad.numpy(), np.asarray(dw))
        )
    return result


def stopping() -> dict[str, Any]:
    # Tutorial row: `detach()`, `torch.no_grad()`
    print("\n== Not differentiating: `detach()`, `torch.no_grad()`")

    def f(x):
        return x * jax.lax.stop_gradient(x)  # the second factor is a constant for the gradient

    g = jax.grad(f)(3.0)
    show("(x * x.detach()).backward(); x.grad", "jax.grad(lambda x: x * stop_gradient(x))", float(g))

    def predict(w, x):  # an evaluation function: nothing is recorded, nothing to switch off
        return x @ w

    out = predict(jnp.ones(2), jnp.ones((3, 2)))
    show("with torch.no_grad(): model(x)", "predict(w, x)  (no grad taken, no tape kept)", out.tolist())
    result = {"stop_gradient_grad": float(g)}
    if torch is not None:
        tx = torch.tensor(3.0, requires_grad=True)
        (tx * tx.detach()).backward()
        result["matches_torch"] = bool(np.isclose(float(tx.grad), float(g)))
        with torch.no_grad():
            result["torch_no_grad_requires_grad"] = bool((tx * 2).requires_grad)
    return result


def accumulation() -> dict[str, Any]:
    # Tutorial row: gradients accumulate, `zero_grad()`
    print("\n== Accumulation: gradients accumulate, `zero_grad()`")

    def f(x):
        return x**2

    first, second = jax.grad(f)(3.0), jax.grad(f)(3.0)
    show("y.backward() twice: x.grad 6 then 12", "jax.grad(f)(3.0) twice", (float(first), float(second)))
    result: dict[str, Any] = {"grad_twice": [float(first), float(second)]}
    if torch is not None:
        tx = torch.tensor(3.0, requires_grad=True)
        (tx**2).backward()
        (tx**2).backward()
        result["torch_accumulated"] = float(tx.grad)  # 12: why the tutorials call zero_grad()
        show("(without zero_grad)", "(nothing accumulates)", f"torch: {result['torch_accumulated']}")

    # When accumulation is wanted (a big batch in small pieces), ask for it: optax.MultiSteps.
    def loss(w, x, y):
        return jnp.mean((x @ w - y) ** 2)

    key_x, key_y = jax.random.split(jax.random.key(0))
    x, y = jax.random.normal(key_x, (8, 3)), jax.random.normal(key_y, (8,))
    w0 = jnp.zeros(3)
    tx = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)  # update every 2 micro-batches
    w, state = w0, tx.init(w0)
    for half in (slice(0, 4), slice(4, 8)):
        updates, state = tx.update(jax.grad(loss)(w, x[half], y[half]), state, w)
        w = optax.apply_updates(w, updates)
    full = w0 - 0.1 * jax.grad(loss)(w0, x, y)  # one step on the whole batch
    show(
        "loss / 2; backward() x2; step(); zero_grad()",
        "optax.MultiSteps(sgd, every_k_schedule=2)",
        f"max |difference| to one full-batch step: {float(jnp.max(jnp.abs(w - full))):.1e}",
    )
    result["multisteps_diff"] = float(jnp.max(jnp.abs(w - full)))
    return result


def manual_update(steps: int) -> dict[str, Any]:
    # Tutorial row: manual update `w -= lr * w.grad` under `no_grad`
    print("\n== Updating by hand: manual update `w -= lr * w.grad` under `no_grad`")
    x = jnp.array([[1.0], [2.0], [3.0], [4.0]])
    y = jnp.array([2.0, 4.0, 6.0, 8.0])  # the autograd tutorial's y = 2x
    params = {"w": jnp.array([[0.5]]), "b": jnp.array([0.0])}
    lr = 0.01

    def loss(p):
        return jnp.mean(((x @ p["w"])[:, 0] + p["b"] - y) ** 2)

    @jax.jit
    def step(p):
        grads = jax.grad(loss)(p)
        return jax.tree.map(lambda q, g: q - lr * g, p, grads)  # every parameter at once

    for _ in range(steps):
        params = step(params)
    show(
        "with torch.no_grad(): w -= lr * w.grad; ...",
        "jax.tree.map(lambda p, g: p - lr * g, ...)",
        f"after {steps} steps: w={float(params['w'][0, 0]):.4f}, b={float(params['b'][0]):.4f}, "
        f"loss={float(loss(params)):.5f}",
    )
    result = {"w": float(params["w"][0, 0]), "b": float(params["b"][0]), "loss": float(loss(params))}
    if torch is not None:
        tw = torch.tensor([[0.5]], requires_grad=True)
        tb = torch.tensor([0.0], requires_grad=True)
        txx, tyy = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
        for _ in range(steps):
            tloss = torch.mean(((txx @ tw)[:, 0] + tb - tyy) ** 2)
            tloss.backward()
            with torch.no_grad():
                tw -= lr * tw.grad
                tb -= lr * tb.grad
            tw.grad.zero_()
            tb.grad.zero_()
        result["matches_torch"] = bool(
            np.isclose(tw.item(), result["w"], atol=1e-5) and np.isclose(tb.item(), result["b"], atol=1e-5)
        )
    return result


def main(quick: bool = False) -> dict[str, Any]:
    """Runs every section; returns their key results."""
    print("Lesson 2: autograd in PyTorch and JAX" + ("" if torch else " (torch not installed: no comparisons)"))
    results = {
        "gradients": gradients(),
        "stopping": stopping(),
        "accumulation": accumulation(),
        "manual_update": manual_update(100 if quick else 1000),
    }
    checks = {name: r["matches_torch"] for name, r in results.items() if "matches_torch" in r}
    if checks:
        print(
            f"\nSame numbers as torch: {sum(checks.values())} of {len(checks)} sections "
            f"({', '.join(k for k, v in checks.items() if not v) or 'all match'})"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer regression steps (the test's mode)")
    main(parser.parse_args().quick)
