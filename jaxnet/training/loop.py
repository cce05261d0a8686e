"""fit's epoch loop: compiled steps fed batch by batch (or one ``lax.scan``), with the host's bookkeeping.

Between compiled steps the host only adds the step's metrics to device-side
sums (:func:`jaxnet.training.stops.accumulate`, no sync), and every ``log_every``
steps reads one loss, calls the callbacks and checks for a non-finite loss or
a stopping signal. :class:`FitLoop` holds that bookkeeping; :func:`train_epoch`
runs one epoch with it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxnet import callbacks as jcallbacks
from jaxnet import data as jdata
from jaxnet.data.inputs import BatchStream, Split, batch_arrays
from jaxnet.errors import DataError, Interrupted, TrainingDiverged
from jaxnet.state import TrainState
from jaxnet.training.plan import _Plan
from jaxnet.training.run_files import RunFiles
from jaxnet.training.steps import FitSteps
from jaxnet.training.stops import NO_STEP, StopSignals, accumulate, all_finite


@dataclasses.dataclass
class FitLoop:
    """The mutable bookkeeping of a running fit (host side)."""

    run: jcallbacks.Run
    steps: FitSteps
    files: RunFiles
    callbacks: Sequence[jcallbacks.Callback]
    batch_size: int
    seed: int
    log_every: int
    checkpoint_every: int | None
    steps_per_epoch: int | None
    progress: bool
    signals: StopSignals
    on_nan: str = "stop"
    sums: dict[str, Any] = dataclasses.field(default_factory=dict)
    first_batch: int = 0
    warned_nonfinite: bool = False
    bad: Any = None  # device scalar: the first step with a non-finite loss, or NO_STEP
    stopped_mid_epoch: int | None = None  # batches done when a signal stopped the epoch
    compiles_after_first_epoch: int | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def check_finite(self) -> None:
        """Raises :class:`TrainingDiverged` (``on_nan="stop"``) once a loss was not finite."""
        step = int(self.bad)
        if step == NO_STEP or self.on_nan == "continue":
            if step != NO_STEP and not self.warned_nonfinite:
                self.warned_nonfinite = True
                logging.getLogger("jaxnet").warning(
                    "the loss is not finite from step %d on; training goes on (on_nan='continue'), and "
                    "checkpoints of non-finite states are not written",
                    step,
                )
            return
        loss = float(self.sums.get("loss", float("nan")))
        raise TrainingDiverged(step, loss if not np.isfinite(loss) else None, self.files.last_saved)

    def meta(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "seed": self.seed,
            "history": self.run.history,
            "sums": {k: float(v) for k, v in self.sums.items()},
            "steps_per_epoch": self.steps_per_epoch,
        }

    def after_step(self, metrics: dict[str, Any], i: int, epoch: int, bar: Any, last: bool) -> None:
        """Bookkeeping after one compiled step: sums, logs and callbacks, mid-epoch checkpoints."""
        self.run.step += 1
        if not self.sums:
            self.sums = jax.tree.map(jnp.zeros_like, metrics)
        self.sums, self.bad = accumulate(self.sums, metrics, self.bad, np.int32(self.run.step))
        if (i + 1) % self.log_every == 0:  # the only host syncs inside an epoch
            self.check_finite()
            logs = {"loss": float(metrics["loss"])}
            jcallbacks.call(self.callbacks, "on_train_batch_end", self.run, self.run.step, logs)
            self.files.logger.log(self.run.step, "train", logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if self.checkpoint_every and self.run.step % self.checkpoint_every == 0 and not last:
            self.save(epoch, i + 1)
        self.files.check_saves()
        bar.update(1)

    def save(self, epoch: int, batch_in_epoch: int, metrics: dict[str, Any] | None = None) -> None:
        """A checkpoint of the current state, only ever of a finite one."""
        if self.files.ckpt is None:
            return
        self.check_finite()
        if not bool(all_finite(self.run.state)):
            if self.on_nan == "continue":
                return
            raise TrainingDiverged(self.run.step, None, self.files.last_saved)
        self.files.save(self.run.step, self.run.state, self.meta(epoch, batch_in_epoch), metrics)

    def restore(self, restored: tuple[TrainState, dict[str, Any]] | None) -> int:
        """Continues exactly where a checkpoint was taken; returns the first epoch to run."""
        if restored is None:
            return 0
        self.run.state, meta = restored
        self.run.step = int(self.run.state.step)
        self.first_batch = meta["batch_in_epoch"]
        self.sums = {k: jnp.asarray(v, jnp.float32) for k, v in meta["sums"].items()}
        self.run.history = list(meta["history"])
        self.steps_per_epoch = self.steps_per_epoch or meta.get("steps_per_epoch")
        return meta["epoch"]

    def stop_for_signal(self) -> None:
        """After the stopping signal's checkpoint: wait until it is durable, then raise Interrupted."""
        self.files.wait()
        raise Interrupted(self.signals.name, self.signals.received, self.run.step, self.files.last_saved)


def _train_batches(
    split: Split, batch_size: int, steps: FitSteps, *, seed: int, epoch: int, start_batch: int
) -> Iterator[Any]:
    """One epoch of training batches from arrays, placed where the step wants them."""
    if jax.process_count() > 1:  # each process reads only its rows of every global batch
        from jaxnet.parallel import multiprocess as distributed

        local = distributed.iterate_process_batches(
            split.x, split.y, batch_size, seed=seed, epoch=epoch, start_batch=start_batch
        )
        return distributed.global_batches(local, steps.mesh)
    batches = jdata.iterate_batches(
        split.x, split.y, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True, start_batch=start_batch
    )
    return jdata.prefetch_to_device(batches, sharding=steps.batch_sharding)


def _streamed_batches(stream: BatchStream, batch_size: int, steps: FitSteps, start_batch: int) -> Iterator[Any]:
    """One epoch of a user's iterable of batches; batches of another size are skipped, and said so."""
    skipped = 0

    def fixed() -> Iterator[dict[str, Any]]:
        nonlocal skipped
        for batch in itertools.islice(stream.make_iterator(), start_batch, None):
            batch = batch_arrays(batch)
            if len(batch["label"]) != batch_size:
                skipped += 1  # another shape would compile the step anew
                continue
            yield batch
        if skipped:
            logging.getLogger("jaxnet").warning(
                "skipped %d training batch(es) whose size is not batch_size=%d (each other size would "
                "recompile the step); make the loader drop its last batch (drop_last=True)",
                skipped,
                batch_size,
            )

    return jdata.prefetch_to_device(fixed(), sharding=steps.batch_sharding)


def _dispatch_limiter(steps: FitSteps) -> Callable[[Any], None]:
    """Multi-device steps on XLA:CPU deadlock when too many are queued: bound them."""
    if steps.mesh is None:
        return lambda outputs: None
    from jaxnet.parallel.sharding import make_dispatch_limiter

    return make_dispatch_limiter()


def train_epoch(loop: FitLoop, plan: _Plan, epoch: int, scan_data: Any) -> dict[str, float]:
    """One epoch of training, step by step, streamed, or as one ``lax.scan``; returns train_* means."""
    skip = loop.first_batch
    loop.first_batch = 0
    if not skip:
        loop.sums = {}
    bar = tqdm(
        total=loop.steps_per_epoch,
        initial=skip,
        desc=f"epoch {epoch + 1}/{loop.run.epochs}",
        disable=None if loop.progress and loop.files.main else True,
        leave=False,
    )
    if scan_data is not None:
        count = _scan_epoch(loop, plan, epoch, scan_data, bar)
    else:
        count = _step_epoch(loop, plan, epoch, skip, bar)
    bar.close()
    if loop.stopped_mid_epoch is not None:
        return {}
    loop.check_finite()
    if loop.steps_per_epoch is None:  # streamed: an epoch is whatever the iterable yielded
        loop.steps_per_epoch = count
    if count == 0:
        raise DataError("the training data yielded no batch of batch_size examples in this epoch")
    return {k: float(v) / count for k, v in loop.sums.items()}


def _scan_epoch(loop: FitLoop, plan: _Plan, epoch: int, scan_data: Any, bar: Any) -> int:
    """The epoch as one compiled ``lax.scan`` over the device-resident split; returns the steps run."""
    run, steps_per_epoch, scan = loop.run, loop.steps_per_epoch, loop.steps.scan
    if scan is None or steps_per_epoch is None:  # plan_fit and build_steps(scan=True) give both for arrays
        raise RuntimeError("a scanned epoch needs steps built with scan=True and a known number of steps")
    perm = jdata.epoch_permutation(len(plan.data.train_split), seed=loop.seed, epoch=epoch, shuffle=True)
    idx = perm[: steps_per_epoch * loop.batch_size].reshape(steps_per_epoch, loop.batch_size)
    images, labels = scan_data  # the training split, placed on the device once
    run.state, per_step = scan(run.state, images, labels, idx.astype(np.int32))
    run.step += steps_per_epoch
    bar.update(steps_per_epoch)
    loop.sums = {k: jnp.sum(v) for k, v in per_step.items()}
    finite = jnp.isfinite(per_step["loss"])
    first = jnp.argmin(finite) + run.step - steps_per_epoch + 1
    loop.bad = jnp.where((loop.bad == NO_STEP) & ~jnp.all(finite), first, loop.bad)
    return steps_per_epoch


def _step_epoch(loop: FitLoop, plan: _Plan, epoch: int, skip: int, bar: Any) -> int:
    """The epoch step by step from batch ``skip`` on, until its end or a stopping signal; returns the batches done."""
    steps, run = loop.steps, loop.run
    throttle = _dispatch_limiter(steps)
    train = plan.data.train
    if isinstance(train, BatchStream):
        batches = _streamed_batches(train, loop.batch_size, steps, skip)
    else:
        batches = _train_batches(train, loop.batch_size, steps, seed=loop.seed, epoch=epoch, start_batch=skip)
    count = skip
    for i, batch in enumerate(batches, start=skip):
        run.state, m = steps.train(run.state, batch)
        throttle(m)
        count = i + 1
        last = loop.steps_per_epoch is not None and count >= loop.steps_per_epoch
        loop.after_step(m, i, epoch, bar, last=last)
        if not last and loop.signals.requested(run.step):
            loop.stopped_mid_epoch = count
            break
    return count
