import time, statistics, numpy as np, jax, jax.numpy as jnp, optax
from jaxnet.models import create_model
from jaxnet.models.conv import use_conv_impl
from jaxnet.state import create_train_state
from jaxnet.step import make_train_step, loss_for_output
for name, B, out in (("convnet", 64, "log_probs"), ("cifar_cnn", 100, "logits")):
    shape = (28, 28, 1) if name == "convnet" else (32, 32, 3)
    batch = {"image": jnp.asarray(np.random.rand(B, *shape).astype(np.float32)), "label": jnp.zeros(B, jnp.int32)}
    runs = {}
    for impl in ("xla", "auto"):
        tx = optax.sgd(0.01, momentum=0.9)
        g, s = create_train_state(create_model(name), tx)
        with use_conv_impl(impl):
            step = make_train_step(g, tx, loss_for_output(out))
            s, _ = step(s, batch); jax.block_until_ready(s)
        runs[impl] = [step, s, []]
    for r in range(5):
        for impl, run in runs.items():
            step, s, times = run
            t = time.perf_counter()
            for _ in range(10): s, _ = step(s, batch)
            jax.block_until_ready(s); times.append(10 / (time.perf_counter() - t)); run[1] = s
    med = {k: statistics.median(v[2]) for k, v in runs.items()}
    print(f"{name} batch {B}: plain lax.conv {med['xla']:.1f} steps/s, jaxnet auto {med['auto']:.1f} steps/s, ratio {med['auto']/med['xla']:.2f}x", flush=True)
