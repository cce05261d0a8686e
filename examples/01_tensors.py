"""Lesson 1: tensors. Every row of the tutorials' "Tensors" table, PyTorch line beside JAX line.

Each section is tagged with the row of ../shared/TUTORIAL_MAP.md it answers
("Tutorial row: ..."), prints the PyTorch line, the JAX line and the result,
and, where torch is installed, checks that both give the same numbers.

Command:  python examples/01_tensors.py            (add --quick: same output; nothing here is slow)
Hardware: any CPU; about 5 s here (2 cores), most of it importing jax and torch.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
except ImportError:  # the lesson runs without torch; it just skips the comparisons
    torch = None


def show(pytorch: str, jax_line: str, value: Any) -> None:
    """Prints one PyTorch line, its JAX counterpart and the JAX result."""
    print(f"  torch: {pytorch:<44} jax: {jax_line:<48} -> {value}")


def same(jax_value: Any, torch_value: Any) -> bool:
    """Whether a JAX and a torch result hold the same numbers (True when torch is absent)."""
    if torch is None:
        return True
    return bool(np.allclose(np.asarray(jax_value), torch_value.detach().numpy(), rtol=1e-6, atol=1e-6))


def creation() -> dict[str, Any]:
    # Tutorial row: `torch.tensor`, `zeros`, `ones`, `rand`, `arange`, `randn`
    print("\n== Creating arrays: `torch.tensor`, `zeros`, `ones`, `rand`, `arange`, `randn`")
    x = jnp.array([[1, 2], [3, 4]])
    show("torch.tensor([[1, 2], [3, 4]])", "jnp.array([[1, 2], [3, 4]])", x.tolist())
    # PyTorch's default integer is int64; JAX's is int32 unless jax_enable_x64 is on.
    show("...dtype (torch.int64)", "x.dtype", x.dtype)
    show("torch.zeros(2, 3)", "jnp.zeros((2, 3))", jnp.zeros((2, 3)).shape)
    show("torch.ones(2, 3)", "jnp.ones((2, 3))", jnp.ones((2, 3)).shape)
    show("torch.arange(0, 10, 2)", "jnp.arange(0, 10, 2)", jnp.arange(0, 10, 2).tolist())
    # Random numbers need an explicit key: no hidden global generator, so a
    # function's output depends on its inputs only (and can be jit-compiled,
    # vmapped and reproduced on any device).
    key = jax.random.key(0)
    key_u, key_n = jax.random.split(key)
    u = jax.random.uniform(key_u, (2, 3))  # torch.rand: U[0, 1)
    n = jax.random.normal(key_n, (2, 3))  # torch.randn: N(0, 1)
    show("torch.rand(2, 3)", "jax.random.uniform(key, (2, 3))", np.round(np.asarray(u, np.float64), 3).tolist())
    show("torch.randn(2, 3)", "jax.random.normal(key, (2, 3))", np.round(np.asarray(n, np.float64), 3).tolist())
    again = jax.random.uniform(key_u, (2, 3))
    show("(torch.rand again: new numbers)", "same key again: same numbers", bool(jnp.all(u == again)))
    result = {"int_dtype": str(x.dtype), "same_key_same_numbers": bool(jnp.all(u == again))}
    if torch is not None:
        result["torch_int_dtype"] = str(torch.tensor([[1, 2], [3, 4]]).dtype)
        result["arange_matches"] = same(jnp.arange(0, 10, 2), torch.arange(0, 10, 2))
    return result


def arithmetic() -> dict[str, Any]:
    # Tutorial row: `+`, `torch.add`, `*`, `matmul`/`@`, `mean`, `sum`
    print("\n== Arithmetic: `+`, `torch.add`, `*`, `matmul`/`@`, `mean`, `sum`")
    a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    b = jnp.array([[5.0, 6.0], [7.0, 8.0]])
    show("a + b  /  torch.add(a, b)", "a + b  /  jnp.add(a, b)", (a + b).tolist())
    show("a * b (elementwise)", "a * b", (a * b).tolist())
    show("torch.matmul(a, b)  /  a @ b", "jnp.matmul(a, b)  /  a @ b", (a @ b).tolist())
    show("a.sum(), a.mean()", "a.sum(), a.mean()", (float(a.sum()), float(a.mean())))
    show("a.sum(dim=0)", "a.sum(axis=0)", a.sum(axis=0).tolist())
    ints = jnp.arange(5)
    # torch.mean refuses integer tensors; jnp.mean returns a float.
    show("torch.arange(5).mean() -> RuntimeError", "jnp.arange(5).mean()", f"{ints.mean()} ({ints.mean().dtype})")
    result = {"int_mean": float(ints.mean()), "int_mean_dtype": str(ints.mean().dtype)}
    if torch is not None:
        ta, tb = torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b))
        result["matmul_matches"] = same(a @ b, ta @ tb) and same(a * b, ta * tb) and same(a.mean(), ta.mean())
        try:
            torch.arange(5).mean()
            result["torch_int_mean_error"] = None
        except RuntimeError as exc:
            result["torch_int_mean_error"] = str(exc).splitlines()[0]
            print(f"  (torch says: {result['torch_int_mean_error']})")
    return result


def reshaping() -> dict[str, Any]:
    # Tutorial row: `view`/reshape, `.t()`, slicing, `.int()` dtype cast
    print("\n== Shapes and dtypes: `view`/reshape, `.t()`, slicing, `.int()` dtype cast")
    x = jnp.arange(12.0)
    m = x.reshape(3, 4)
    show("x.view(3, 4)  /  x.reshape(3, 4)", "x.reshape(3, 4)", m.shape)
    show("x.view(-1, 6)", "x.reshape(-1, 6)", x.reshape(-1, 6).shape)
    show("m.t()", "m.T", m.T.shape)
    show("m[1:, :2]", "m[1:, :2]", m[1:, :2].tolist())
    show("m.int()", "m.astype(jnp.int32)", m.astype(jnp.int32).dtype)
    # Arrays are immutable: an in-place write is an error, .at[] returns a new array.
    try:
        m[0, 0] = 100.0
        write_error = None
    except TypeError as exc:
        write_error = type(exc).__name__
    show("m[0, 0] = 100 (in place)", "m[0, 0] = 100 -> TypeError", write_error)
    m2 = m.at[0, 0].set(100.0)
    show("m[0, 0] = 100", "m2 = m.at[0, 0].set(100.0)", (float(m2[0, 0]), "m unchanged:", float(m[0, 0])))
    show("m[:, 1] += 1", "m.at[:, 1].add(1)", m.at[:, 1].add(1)[:, 1].tolist())
    return {"in_place_write_error": write_error, "at_set": float(m2[0, 0]), "original_kept": float(m[0, 0])}


def joining() -> dict[str, Any]:
    # Tutorial row: `torch.cat(dim=0/1)`, broadcasting, `clone`
    print("\n== Joining and broadcasting: `torch.cat(dim=0/1)`, broadcasting, `clone`")
    a, b = jnp.ones((2, 3)), jnp.zeros((2, 3))
    show("torch.cat([a, b], dim=0)", "jnp.concatenate([a, b], axis=0)", jnp.concatenate([a, b], axis=0).shape)
    show("torch.cat([a, b], dim=1)", "jnp.concatenate([a, b], axis=1)", jnp.concatenate([a, b], axis=1).shape)
    col, row = jnp.arange(3.0).reshape(3, 1), jnp.arange(4.0).reshape(1, 4)
    grid = col + row  # (3, 1) + (1, 4) -> (3, 4): the same NumPy broadcasting rules as PyTorch
    show("(3,1) + (1,4)", "(3,1) + (1,4)", grid.shape)
    # clone() protects against in-place edits; JAX arrays cannot be edited, so sharing is safe.
    y = a
    z = y.at[0, 0].set(5.0)
    show("y = a.clone(); y[0,0] = 5", "z = a.at[0, 0].set(5.0)  (no clone needed)", (float(a[0, 0]), float(z[0, 0])))
    result = {
        "cat0": jnp.concatenate([a, b], axis=0).shape,
        "cat1": jnp.concatenate([a, b], axis=1).shape,
        "broadcast": grid.shape,
    }
    if torch is not None:
        result["broadcast_matches"] = same(grid, torch.arange(3.0).reshape(3, 1) + torch.arange(4.0).reshape(1, 4))
    return result


def masking() -> dict[str, Any]:
    # Tutorial row: indexing, boolean mask `x[x > 3]`, `F.pad`
    print("\n== Indexing, masks and padding: indexing, boolean mask `x[x > 3]`, `F.pad`")
    x = jnp.array([1.0, 5.0, 2.0, 7.0, 4.0])
    show("x[[0, 2]]", "x[jnp.array([0, 2])]", x[jnp.array([0, 2])].tolist())
    show("x[x > 3]", "x[x > 3]  (outside jit)", x[x > 3].tolist())
    # Under jit the result's shape would depend on the values: not allowed in a static graph.
    try:
        jax.jit(lambda v: v[v > 3])(x)
        jit_error = None
    except jax.errors.NonConcreteBooleanIndexError as exc:
        jit_error = type(exc).__name__
    show("(fine in PyTorch, any time)", "jit(lambda v: v[v > 3]) ->", jit_error)
    kept = jax.jit(lambda v: jnp.where(v > 3, v, 0.0))(x)  # same shape, masked values zeroed
    show("x * (x > 3)", "jnp.where(x > 3, x, 0.0)  (jit ok)", kept.tolist())
    (idx,) = jax.jit(lambda v: jnp.nonzero(v > 3, size=3, fill_value=-1))(x)  # a static upper bound
    show("torch.nonzero(x > 3)", "jnp.nonzero(x > 3, size=3, fill_value=-1)", idx.tolist())
    total = jax.jit(lambda v: jnp.sum(v, where=v > 3))(x)
    show("x[x > 3].sum()", "jnp.sum(x, where=x > 3)  (jit ok)", float(total))
    img = jnp.ones((1, 2, 2))
    # F.pad lists pads from the LAST axis backwards; jnp.pad lists (before, after) per axis in order.
    padded = jnp.pad(img, ((0, 0), (1, 1), (2, 2)))
    show("F.pad(img, (2, 2, 1, 1))", "jnp.pad(img, ((0,0), (1,1), (2,2)))", padded.shape)
    result = {
        "masked": x[x > 3].tolist(),
        "jit_mask_error": jit_error,
        "where": kept.tolist(),
        "nonzero": idx.tolist(),
        "masked_sum": float(total),
        "padded_shape": padded.shape,
    }
    if torch is not None:
        tpad = torch.nn.functional.pad(torch.ones(1, 2, 2), (2, 2, 1, 1))
        result["pad_matches"] = same(padded, tpad)
        tx = torch.tensor(np.asarray(x))
        result["mask_matches"] = same(x[x > 3], tx[tx > 3])
    return result


def devices() -> dict[str, Any]:
    # Tutorial row: CPU/GPU `to(device)`
    print("\n== Devices: CPU/GPU `to(device)`")
    devs = jax.devices()
    show("torch.device('cuda' if ... else 'cpu')", "jax.devices()", [str(d) for d in devs])
    x = jnp.arange(8.0)  # created on the default device (the first accelerator, else the CPU)
    show("x.device", "x.devices()", {str(d) for d in x.devices()})
    y = jax.device_put(x, devs[-1])
    show("x.to(device)", "jax.device_put(x, device)", {str(d) for d in y.devices()})
    # Beyond one device: a sharding says how an array is split over a mesh of devices.
    mesh = jax.make_mesh((len(devs),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(jnp.arange(8.0 * len(devs)), jax.sharding.NamedSharding(mesh, jax.P("data")))
    shards = [s.data.shape for s in sharded.addressable_shards]
    show("(DistributedDataParallel splits batches)", "device_put(x, NamedSharding(mesh, P('data')))", shards)
    return {"num_devices": len(devs), "shard_shapes": shards}


def main(quick: bool = False) -> dict[str, Any]:
    """Runs every section; returns their key results (``quick`` changes nothing here: all are fast)."""
    del quick
    print("Lesson 1: tensors in PyTorch and JAX" + ("" if torch else " (torch not installed: no comparisons)"))
    results = {}
    for section in (creation, arithmetic, reshaping, joining, masking, devices):
        results[section.__name__] = section()
    checks = {f"{s}.{k}": v for s, r in results.items() for k, v in r.items() if k.endswith("_matches")}
    if checks:
        print(
            f"\nSame numbers as torch: {sum(checks.values())} of {len(checks)} checks "
            f"({', '.join(k for k, v in checks.items() if not v) or 'all match'})"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test's fast mode")
    main(parser.parse_args().quick)
