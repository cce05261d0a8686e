"""Lesson 3: dynamic graph vs static graph, each habit of the tutorials with its measured cost.

The tutorials' dynamic-graph habits -- a Python ``if`` on a tensor value, a
loop of random depth, sentences of any length without padding, printing
intermediate values -- each meet ``jax.jit`` here: first the error or the
retracing you get, then the static-graph answer, then the price of both sides
(compilations counted with ``jaxnet.CompileCounter``, steps per second timed;
PyTorch eager's number beside, when torch is installed, on one thread). The last section
shows what the static graph buys: XLA fuses the whole function into few
kernels, and ``jax.export`` ships it without the Python code. Each section is
tagged with the row of ../shared/TUTORIAL_MAP.md it answers.

Command:  python examples/03_dynamic_vs_static.py          (--quick: fewer steps, for the test)
Hardware: 2-core CPU. Full run about 30 s here, --quick about 20 s (a shared machine:
          the timings move with its load, the compile counts do not).
"""

from __future__ import annotations

import argparse
import io
import random
import re
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import export, lax

from jaxnet import CompileCounter

try:
    import torch
except ImportError:  # the lesson runs without torch; the PyTorch numbers are skipped
    torch = None


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Calls per second of ``fn`` (which must block until its work is done)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"


# --- 1. A Python `if` on a tensor value ---------------------------------------------------


def if_on_values(calls: int) -> dict[str, Any]:
    # Tutorial row: Python `if x.sum() > 0` on tensor values
    print("\n== 1. Python `if x.sum() > 0` on tensor values")

    def dynamic(x):  # the tutorials' style: the branch taken depends on the data
        if x.sum() > 0:
            return x * 2.0
        return -x

    pos, neg = jnp.arange(1.0, 5.0), -jnp.arange(1.0, 5.0)
    try:
        jax.jit(dynamic)(pos)
        error = None
    except jax.errors.TracerBoolConversionError as exc:
        error = first_line(exc)
    print(f"  jax.jit(dynamic)(x) -> {error}")
    print("  why: jit traces with abstract values (shape and dtype only); a Python `if` needs a concrete bool.")

    def with_cond(x):  # both branches are compiled; the device picks one at run time
        return lax.cond(x.sum() > 0, lambda v: v * 2.0, lambda v: -v, x)

    def with_where(x):  # both branches are computed; the result is selected elementwise
        return jnp.where(x.sum() > 0, x * 2.0, -x)

    def host_branch(x, positive: bool):  # the "retrace" answer: the branch becomes a compile-time constant
        return x * 2.0 if positive else -x

    cond_jit, where_jit = jax.jit(with_cond), jax.jit(with_where)
    host_jit = jax.jit(host_branch, static_argnames="positive")
    expected = {sign: dynamic(x) for sign, x in (("+", pos), ("-", neg))}  # eager, outside the counter
    counts = {}
    for name, fn in (
        ("lax.cond", lambda x: cond_jit(x)),
        ("jnp.where", lambda x: where_jit(x)),
        ("static bool, host sync", lambda x: host_jit(x, positive=bool(x.sum() > 0))),
    ):
        with CompileCounter() as counter:
            outputs = {sign: fn(x) for sign, x in (("+", pos), ("-", neg))}
        same = all(bool(jnp.all(outputs[k] == expected[k])) for k in expected)
        counts[name] = {"compiles": counter.compiles, "matches_python_if": same}
        rate = timed(lambda fn=fn: fn(pos).block_until_ready(), calls)
        counts[name]["calls_per_sec"] = rate
        print(
            f"  {name:<24} compiles for both signs: {counter.compiles}   same as the Python if: {same}"
            f"   {rate:,.0f} calls/s"
        )
    if torch is not None:
        tpos = torch.arange(1.0, 5.0)

        def torch_dynamic():
            return tpos * 2.0 if tpos.sum() > 0 else -tpos

        counts["torch eager"] = {"calls_per_sec": timed(torch_dynamic, calls)}
        print(
            f"  {'torch eager (Python if)':<24} no compile                              "
            f"{counts['torch eager']['calls_per_sec']:,.0f} calls/s"
        )
    return {"jit_error": error, "variants": counts}


# --- 2. A loop of random depth -------------------------------------------------------------

DEPTH_MAX, WIDTH, IN, CLASSES = 5, 128, 64, 10


def init_deep(key: jax.Array) -> dict[str, jax.Array]:
    keys = jax.random.split(key, 3)
    scale = lambda fan_in: 1.0 / np.sqrt(fan_in)  # noqa: E731
    return {
        "w_in": jax.random.normal(keys[0], (IN, WIDTH)) * scale(IN),
        "b_in": jnp.zeros(WIDTH),
        "w_hidden": jax.random.normal(keys[1], (DEPTH_MAX, WIDTH, WIDTH)) * scale(WIDTH),  # stacked: (L, H, H)
        "b_hidden": jnp.zeros((DEPTH_MAX, WIDTH)),
        "w_out": jax.random.normal(keys[2], (WIDTH, CLASSES)) * scale(WIDTH),
        "b_out": jnp.zeros(CLASSES),
    }


def deep_unrolled(params, x, depth: int):
    """The PyTorch habit: ``for i in range(depth)`` in Python; jit unrolls it, one program per depth."""
    h = jax.nn.relu(x @ params["w_in"] + params["b_in"])
    for i in range(depth):
        h = jax.nn.relu(h @ params["w_hidden"][i] + params["b_hidden"][i])
    return h @ params["w_out"] + params["b_out"]


def deep_scanned(params, x, depth):
    """The static answer: ``lax.scan`` over the stacked layers, skipping those past ``depth``."""
    h = jax.nn.relu(x @ params["w_in"] + params["b_in"])

    def layer(h, inputs):
        i, w, b = inputs
        return jnp.where(i < depth, jax.nn.relu(h @ w + b), h), None  # (B, H)

    h, _ = lax.scan(layer, h, (jnp.arange(DEPTH_MAX), params["w_hidden"], params["b_hidden"]))
    return h @ params["w_out"] + params["b_out"]


def random_depth(steps: int) -> dict[str, Any]:
    # Tutorial row: loops, dynamic depth (`random.randint(1,5)` layers per call)
    print("\n== 2. loops, dynamic depth (`random.randint(1,5)` layers per call)")
    params = init_deep(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, IN))
    y = jax.random.randint(jax.random.key(2), (64,), 0, CLASSES)
    tx = optax.sgd(0.01)
    rng = random.Random(0)
    depths = [rng.randint(1, DEPTH_MAX) for _ in range(steps)]  # the tutorial's random.randint(1, 5)

    def make_step(forward):
        def step(params, opt_state, depth):
            loss, grads = jax.value_and_grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, x, depth), y).mean()
            )(params)
            updates, opt_state = tx.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    same = all(
        bool(jnp.allclose(deep_unrolled(params, x, d), deep_scanned(params, x, d), atol=1e-5))
        for d in range(1, DEPTH_MAX + 1)
    )
    print(f"  scan-with-mask output equals the Python loop's for every depth: {same}")
    # fori_loop takes a traced trip count, but reverse-mode grad cannot go through it:
    fori = lambda p, d: lax.fori_loop(0, d, lambda i, h: h @ p["w_hidden"][i], x @ p["w_in"]).sum()  # noqa: E731
    try:
        jax.grad(jax.jit(fori))(params, jnp.int32(3))
        fori_error = None
    except ValueError as exc:
        fori_error = first_line(exc)
    print(f"  jax.grad through lax.fori_loop(0, depth, ...) with a traced depth -> {fori_error}")
    print("  (fine for inference; for training, scan over all layers and mask the unused ones)")

    results = {"scan_matches_loop": same, "fori_grad_error": fori_error}
    variants = {
        "retrace per depth": jax.jit(make_step(deep_unrolled), static_argnames="depth"),
        "lax.scan + mask": jax.jit(make_step(deep_scanned)),
    }
    for name, step in variants.items():
        state = (params, tx.init(params))
        start = time.perf_counter()
        with CompileCounter() as counter:
            for d in depths:
                p, o, loss = step(*state, depth=d if name.startswith("retrace") else jnp.int32(d))
                state = (p, o)
            loss.block_until_ready()
        total = time.perf_counter() - start
        start = time.perf_counter()  # steady state: every depth compiled already
        for d in depths:
            p, o, loss = step(*state, depth=d if name.startswith("retrace") else jnp.int32(d))
            state = (p, o)
        loss.block_until_ready()
        rate = steps / (time.perf_counter() - start)
        results[name] = {
            "compiles": counter.compiles,
            "compile_seconds": counter.compile_seconds,
            "first_pass_seconds": total,
            "steps_per_sec": rate,
        }
        print(
            f"  {name:<18} compiles: {counter.compiles} ({counter.compile_seconds:.2f} s compiling; "
            f"first {steps} steps {total:.2f} s)   steady state {rate:,.0f} steps/s"
        )
    if torch is not None:
        results["torch eager"] = {"steps_per_sec": _torch_random_depth(params, x, y, depths)}
        print(
            f"  {'torch eager':<18} compiles: 0                                          "
            f"steady state {results['torch eager']['steps_per_sec']:,.0f} steps/s"
        )
    print(
        f"  the price of one program: scan + mask computes all {DEPTH_MAX} layers every step (the unused ones "
        f"are masked),\n  retracing computes only `depth` layers but compiles a program per depth"
    )
    return results


def _torch_random_depth(params, x, y, depths: list[int]) -> float:
    nn = torch.nn

    class DynamicNet(nn.Module):  # the tutorial's model: a Python loop of random depth in forward()
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(IN, WIDTH), nn.Linear(WIDTH, CLASSES)
            self.hidden = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH_MAX))

        def forward(self, x, depth):
            h = torch.relu(self.inp(x))
            for layer in self.hidden[:depth]:
                h = torch.relu(layer(h))
            return self.out(h)

    model = DynamicNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tx_, ty = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.int64)

    def step(depth):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tx_, depth), ty).backward()
        opt.step()

    for d in depths[:5]:
        step(d)
    start = time.perf_counter()
    for d in depths:
        step(d)
    return len(depths) / (time.perf_counter() - start)


# --- 3. Variable-length sentences -----------------------------------------------------------

VOCAB, EMBED, HIDDEN, MIN_LEN, MAX_LEN = 8, 16, 32, 4, 64
BUCKETS = (16, 32, 48, 64)  # padded lengths: every batch compiles into one of these shapes


def make_sentences(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Random token sentences of length 4..64; label 1 when token 2 occurs more often than token 3."""
    rng = np.random.default_rng(seed)
    sentences = [rng.integers(1, VOCAB, size=int(rng.integers(MIN_LEN, MAX_LEN + 1))) for _ in range(n)]
    labels = np.array([int(np.sum(s == 2) > np.sum(s == 3)) for s in sentences], np.int32)
    return sentences, labels


def init_gru(key: jax.Array) -> dict[str, jax.Array]:
    """Embedding + one GRU layer (PyTorch's gate layout r, z, n) + a linear classifier."""
    k = jax.random.split(key, 4)
    bound = 1.0 / np.sqrt(HIDDEN)
    uniform = lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound)  # noqa: E731
    return {
        "embed": jax.random.normal(k[0], (VOCAB, EMBED)),
        "w_i": uniform(k[1], (EMBED, 3 * HIDDEN)),
        "w_h": uniform(k[2], (HIDDEN, 3 * HIDDEN)),
        "b_i": jnp.zeros(3 * HIDDEN),
        "b_h": jnp.zeros(3 * HIDDEN),
        "w_o": uniform(k[3], (HIDDEN, 2)),
        "b_o": jnp.zeros(2),
    }


def gru_classify(params, tokens, mask):
    """``tokens``/``mask``: (B, T) padded ids and True where real; returns (B, 2) logits.

    The hidden state stops changing after a sentence's last real token, so the
    final state is the one PyTorch would give for the unpadded sentence.
    """
    gates_x = params["embed"][tokens] @ params["w_i"] + params["b_i"]  # (B, T, 3H): all time steps in one matmul

    def cell(h, inputs):  # h: (B, H)
        gx, m = inputs
        gh = h @ params["w_h"] + params["b_h"]
        r = jax.nn.sigmoid(gx[:, :HIDDEN] + gh[:, :HIDDEN])
        z = jax.nn.sigmoid(gx[:, HIDDEN : 2 * HIDDEN] + gh[:, HIDDEN : 2 * HIDDEN])
        n = jnp.tanh(gx[:, 2 * HIDDEN :] + r * gh[:, 2 * HIDDEN :])
        return jnp.where(m[:, None], (1.0 - z) * n + z * h, h), None

    h0 = jnp.zeros((tokens.shape[0], HIDDEN))
    h, _ = lax.scan(cell, h0, (jnp.swapaxes(gates_x, 0, 1), jnp.swapaxes(mask, 0, 1)))  # scan over T
    return h @ params["w_o"] + params["b_o"]


def pad_batch(sentences: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(sentences), length), np.int32)
    for i, s in enumerate(sentences):
        tokens[i, : len(s)] = s
    return tokens, tokens > 0  # token 0 is padding


def bucket_of(length: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= length)


def bucketed_batches(sentences, labels, batch_size: int, steps: int, seed: int, buckets: tuple[int, ...]):
    """Batches of sentences from one length bucket each (buckets in turn), padded to the bucket's length."""
    rng = np.random.default_rng(seed)
    pools = {b: [i for i, s in enumerate(sentences) if bucket_of(len(s), buckets) == b] for b in buckets}
    for step in range(steps):
        bucket = buckets[step % len(buckets)]
        idx = rng.choice(pools[bucket], size=batch_size, replace=False)
        yield (*pad_batch([sentences[i] for i in idx], bucket), labels[idx])


def variable_length(steps: int, batch_size: int = 32, buckets: tuple[int, ...] = BUCKETS) -> dict[str, Any]:
    # Tutorial row: variable-length sentences, "no padding needed"
    print('\n== 3. variable-length sentences, "no padding needed"')
    sentences, labels = make_sentences(4000, seed=0)
    test_s, test_y = make_sentences(512, seed=1)
    params = init_gru(jax.random.key(0))
    tx = optax.adam(1e-2)

    def make_step():  # a new function each time: jit's cache is per function, so nothing is compiled yet
        def train_step(params, opt_state, tokens, mask, y):
            loss, grads = jax.value_and_grad(
                lambda p: optax.softmax_cross_entropy_with_integer_labels(gru_classify(p, tokens, mask), y).mean()
            )(params)
            updates, opt_state = tx.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(train_step)

    one = sentences[0]
    unpadded = gru_classify(params, jnp.asarray(one[None]), jnp.ones((1, len(one)), bool))
    padded = gru_classify(params, *map(jnp.asarray, pad_batch([one], MAX_LEN)))
    mask_ok = bool(jnp.allclose(unpadded, padded, atol=1e-5))
    print(f"  a sentence of length {len(one)} padded to {MAX_LEN} and masked gives the unpadded logits: {mask_ok}")

    results: dict[str, Any] = {"mask_matches_unpadded": mask_ok}
    rng = np.random.default_rng(1)
    exact = []  # the naive static version: pad each batch to its own longest sentence
    for _ in range(steps):
        idx = rng.choice(len(sentences), size=batch_size, replace=False)
        batch = [sentences[i] for i in idx]
        exact.append((*pad_batch(batch, max(len(s) for s in batch)), labels[idx]))
    plans = {
        "pad to batch max": exact,
        f"{len(buckets)} length buckets": list(bucketed_batches(sentences, labels, batch_size, steps, 2, buckets)),
    }
    for name, batches in plans.items():
        step = make_step()
        state = (params, tx.init(params))
        start = time.perf_counter()
        with CompileCounter() as counter:
            for batch in batches:
                *state, loss = step(*state, *batch)
            loss.block_until_ready()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches:
            *state, loss = step(*state, *batch)
        loss.block_until_ready()
        rate = steps / (time.perf_counter() - start)
        tokens, mask = pad_batch(test_s, MAX_LEN)
        accuracy = float(jnp.mean(jnp.argmax(gru_classify(state[0], tokens, mask), -1) == test_y))
        shapes = len({b[0].shape for b in batches})
        results[name] = {
            "compiles": counter.compiles,
            "distinct_shapes": shapes,
            "first_pass_seconds": first,
            "steps_per_sec": rate,
            "accuracy": accuracy,
        }
        print(
            f"  {name:<22} {shapes:>2} shapes -> {counter.compiles:>2} compiles ({counter.compile_seconds:.1f} s); "
            f"first pass {first:.1f} s, then {rate:,.1f} steps/s; "
            f"test accuracy after {2 * steps} steps {accuracy:.3f}"
        )
    if torch is not None:
        batches = plans["pad to batch max"][: min(steps, 10)]  # the same sentences, unpadded again
        rate = _torch_variable_length(batches, batch_size)
        results["torch per-sentence"] = {"steps_per_sec": rate, "compiles": 0}
        print(f"  torch, one sentence at a time, no padding: 0 compiles; {rate:,.1f} steps/s")
    print(
        "  buckets bound the number of programs and waste less compute on padding than one maximum length;\n"
        "  the batched, padded step beats a per-sentence loop because each time step is one (B, H) matmul"
    )
    return results


def _torch_variable_length(batches, batch_size: int) -> float:
    """Steps/s of the tutorials' way: each sentence through ``nn.GRU`` at its own length."""
    nn = torch.nn
    torch.manual_seed(0)
    embed, gru, head = nn.Embedding(VOCAB, EMBED), nn.GRU(EMBED, HIDDEN, batch_first=True), nn.Linear(HIDDEN, 2)
    opt = torch.optim.Adam([*embed.parameters(), *gru.parameters(), *head.parameters()], lr=1e-2)

    def logits(sentence):  # one sentence, its own length: the dynamic graph needs no padding
        _, h = gru(embed(torch.from_numpy(sentence.astype(np.int64))[None]))  # h: (1, 1, H)
        return head(h[0])

    def step(tokens, mask, y):
        opt.zero_grad()
        loss = sum(
            nn.functional.cross_entropy(logits(t[m]), torch.tensor([int(c)])) for t, m, c in zip(tokens, mask, y)
        )
        (loss / batch_size).backward()
        opt.step()

    step(*batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        step(*batch)
    return len(batches) / (time.perf_counter() - start)


# --- 4. Printing intermediate values ---------------------------------------------------------


def printing() -> dict[str, Any]:
    # Tutorial row: print intermediate values while debugging
    print("\n== 4. print intermediate values while debugging")
    python_prints, debug_prints = [], []

    @jax.jit
    def f(x):
        y = jnp.sin(x) * 2.0
        print(f"    python print inside jit sees: {y}")  # runs once, while tracing: a tracer, no value
        python_prints.append(1)
        jax.debug.print("    jax.debug.print sees: {y:.4f}", y=y)  # runs on every call, with the value
        jax.debug.callback(lambda v: debug_prints.append(float(v)), y)
        return y + 1.0

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        for value in (1.0, 2.0, 3.0):
            f(value).block_until_ready()
        jax.effects_barrier()  # debug prints are asynchronous; wait for them
        with jax.disable_jit():  # op-by-op, as in PyTorch: a Python print shows numbers
            f(0.5)
    print(buffer.getvalue().rstrip())
    tracer_seen = "Tracer" in buffer.getvalue()
    print(
        f"  three jitted calls: Python print ran {python_prints.count(1) - 1} time(s) while tracing "
        f"(plus once under disable_jit), jax.debug.print {len(debug_prints) - 1} times (plus once)"
    )
    return {
        "python_print_calls_jitted": python_prints.count(1) - 1,
        "debug_print_calls": len(debug_prints) - 1,
        "python_print_saw_tracer": tracer_seen,
        "debug_values": debug_prints,
    }


# --- 5. Optimized globally, deployed without Python ----------------------------------------------


def gelu_layer(x, w):
    h = x @ w  # (B, N)
    return jnp.sum(0.5 * h * (1.0 + jnp.tanh(0.7978845608 * (h + 0.044715 * h**3))), axis=-1)


def optimized_globally(calls: int) -> dict[str, Any]:
    # Tutorial row: "static graphs can be optimized globally, good for deployment"
    print('\n== 5. "static graphs can be optimized globally, good for deployment"')
    x = jax.random.normal(jax.random.key(0), (1024, 128))  # many elementwise ops on a (1024, 128) array
    w = jax.random.normal(jax.random.key(1), (128, 128)) * 0.1
    lowered = jax.jit(gelu_layer).lower(x, w)
    ops = len(re.findall(r"= stablehlo\.", lowered.as_text()))
    hlo = lowered.compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    kernels = sum(1 for line in entry.splitlines()[1:] if " = " in line and "parameter(" not in line)
    print(f"  the traced function has {ops} StableHLO ops; after XLA's fusion the program runs {kernels} kernel(s)")
    fused = jax.jit(gelu_layer)
    fused(x, w).block_until_ready()
    gelu_layer(x, w).block_until_ready()  # un-jitted: JAX dispatches one compiled op at a time, like PyTorch
    eager_rate = timed(lambda: gelu_layer(x, w).block_until_ready(), calls)
    jit_rate = timed(lambda: fused(x, w).block_until_ready(), calls)
    same = bool(jnp.allclose(fused(x, w), gelu_layer(x, w), rtol=1e-5, atol=1e-3))
    print(
        f"  op by op (no jit): {eager_rate:,.0f} calls/s;  jit (fused): {jit_rate:,.0f} calls/s;  same numbers: {same}"
    )
    result = {
        "stablehlo_ops": ops,
        "compiled_kernels": kernels,
        "eager_calls_per_sec": eager_rate,
        "jit_calls_per_sec": jit_rate,
        "jit_matches_eager": same,
    }
    if torch is not None:
        tx_, tw = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(w))

        def torch_layer():
            h = tx_ @ tw
            return torch.sum(0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * h**3))), dim=-1)

        result["torch_eager_calls_per_sec"] = timed(torch_layer, calls)
        print(f"  torch eager (one kernel per op): {result['torch_eager_calls_per_sec']:,.0f} calls/s")

    # Deployment: the compiled computation, serialized; any batch size; no Python model code needed to run it.
    batch = export.symbolic_shape("batch")
    exported = export.export(jax.jit(gelu_layer))(
        jax.ShapeDtypeStruct((batch[0], 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32)
    )
    blob = exported.serialize()
    restored = export.deserialize(blob)
    outs = {n: restored.call(x[:n], w) for n in (3, 17)}
    exact = all(bool(jnp.allclose(o, fused(x[: o.shape[0]], w), atol=1e-4)) for o in outs.values())
    print(
        f"  jax.export: {len(blob):,} bytes of serialized StableHLO for inputs {restored.in_avals[0]}; "
        f"reloaded and called with batch 3 and 17: same outputs: {exact}"
    )
    print("  (torch.jit.trace/script's role; see also jaxnet.export for whole models)")
    result.update(export_bytes=len(blob), export_matches=exact)
    return result


def main(quick: bool = False) -> dict[str, Any]:
    """Runs the five sections; returns their measurements (``quick``: fewer steps and calls)."""
    print("Lesson 3: dynamic vs static graphs" + ("" if torch else " (torch not installed: no PyTorch numbers)"))
    if torch is not None:
        # The ops here are tiny; one PyTorch thread was fastest on this 2-core machine (two threads
        # made the per-sentence GRU ~10x slower under load). XLA runs such small ops on one core too.
        torch.set_num_threads(1)
    calls = 200 if quick else 2000
    return {
        "if_on_values": if_on_values(calls),
        "random_depth": random_depth(20 if quick else 200),
        "variable_length": variable_length(2 if quick else 100, buckets=(32, 64) if quick else BUCKETS),
        "printing": printing(),
        "optimized_globally": optimized_globally(calls // 4),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and calls (the test's mode)")
    main(parser.parse_args().quick)
