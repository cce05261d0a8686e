"""A few data-parallel training steps, run in every launched process by tests/parallel/test_multiprocess.py.

``python tests/parallel/multiprocess_worker.py OUT_DIR {train,die}`` under
``jaxnet launch``: ``train`` runs the steps with the replicated and the FSDP
layout, and process 0 alone writes ``OUT_DIR/result.npz``; ``die`` makes
process 1 exit with status 3 while process 0 waits in a collective that can
never complete (its heartbeat timeout is 5 s, so even without the launcher it
stops; test_launcher.py launches that too). The test imports
:func:`run_steps` to compute the single-process reference with the same code.
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

STEPS = 3
GLOBAL_BATCH = 32


def run_steps(*, fsdp: bool) -> dict[str, np.ndarray]:
    """``STEPS`` Adam steps of the dropout MLP on synthetic data; returns flat params and losses."""
    import jax
    import optax

    from jaxnet.models import create_model
    from jaxnet.parallel import multiprocess as distributed
    from jaxnet.parallel import sharding
    from jaxnet.state import create_train_state
    from jaxnet.step import loss_for_output
    from jaxnet.train import make_image_transform

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(256, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=256).astype(np.int32)
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(create_model("mlp", seed=0), tx, seed=0)
    mesh = sharding.make_mesh()
    shardings = sharding.state_shardings(state, mesh, fsdp=fsdp)
    state = sharding.shard_state(state, shardings)
    step = sharding.make_sharded_train_step(
        graphdef, tx, loss_for_output("logits"), mesh, shardings, transform=make_image_transform((0.5,), (0.5,))
    )
    local = distributed.iterate_process_batches(images, labels, GLOBAL_BATCH, shuffle=True, seed=0, epoch=0)
    losses = []
    wait = sharding.make_dispatch_limiter()
    for batch in distributed.global_batches(local, mesh):
        state, metrics = step(state, batch)
        wait(metrics)
        losses.append(float(metrics["loss"]))
        if len(losses) == STEPS:
            break
    # Evaluation: every process passes the same whole batch (any size) and can read the outputs.
    evaluate = sharding.make_sharded_eval_step(
        graphdef, loss_for_output("logits"), mesh, shardings, transform=make_image_transform((0.5,), (0.5,))
    )
    eval_batch = {"image": images[:20], "label": labels[:20]}
    outputs = np.asarray(evaluate(state, eval_batch)["outputs"])
    placed = jax.device_put(eval_batch, sharding.replicated(mesh))
    eval_loss = np.asarray(evaluate(state, placed)["loss"])
    params = distributed.gather_to_host(state.params)
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    sharded = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
    return {
        "losses": np.asarray(losses),
        "num_sharded": np.asarray(sharded),
        "eval_outputs": outputs,
        "eval_loss": eval_loss,
        **flat,
    }


def _die() -> None:
    import jax
    import jax.numpy as jnp

    from jaxnet.parallel import multiprocess as distributed
    from jaxnet.parallel import sharding

    mesh = sharding.make_mesh()
    if jax.process_index() == 1:
        os._exit(3)
    x = distributed.global_batch_from_local(np.ones((4, 2), np.float32), mesh)
    print(float(jax.jit(jnp.sum)(x)))  # waits for process 1's shard forever
    sys.exit(0)


def main() -> None:
    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    from jaxnet.parallel import multiprocess as distributed

    # A short heartbeat timeout: in "die" mode, without the launcher, process 0
    # must notice the death of process 1 within seconds.
    distributed.initialize_from_env(heartbeat_timeout_seconds=5 if mode == "die" else 20)
    import jax

    if mode == "die":
        _die()
    results = {}
    for fsdp in (False, True):
        for key, value in run_steps(fsdp=fsdp).items():
            results[f"{'fsdp' if fsdp else 'dp'}:{key}"] = value
    results["num_devices"] = np.asarray(jax.device_count())
    results["num_processes"] = np.asarray(jax.process_count())
    if distributed.is_main_process():
        np.savez(out / "result.npz", **results)
    else:
        (out / f"process{jax.process_index()}.txt").write_text(str(jax.local_device_count()))


if __name__ == "__main__":
    main()
