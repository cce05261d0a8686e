"""What checkpointing costs: ``jaxnet train`` with and without ``--workdir``, and one save per array format.

Runs ``python -m jaxnet train ... --json`` (the model's tutorial recipe), one
fresh process per run as a user would, alternately without a workdir and with one
(an Orbax checkpoint, TensorBoard scalars and parameter histograms at every
epoch end), in ABBA order so that a drift in the machine's load hits both
alike. Each run reports ``train_seconds`` (the whole training loop: steps,
evaluation, and with a workdir the saves and the wait for the last one to be
committed) and ``checkpoint_seconds`` (the part of it the loop spent blocked
in saves). The overhead is the median over pairs of the per-pair ratio.

Commands (results in benchmarks/CHECKPOINTS.md)::

    python benchmarks/checkpoint_overhead.py --data-dir ../shared/data
    python benchmarks/checkpoint_overhead.py --data-dir ../shared/data --model cifar_cnn --epochs 2 --pairs 3
    python benchmarks/checkpoint_overhead.py --model mlp --no-download --epochs 1 --pairs 1   # embedded sample, seconds
    python benchmarks/checkpoint_overhead.py --save-costs-only --model convnet --saves 20     # one save, both formats
    python benchmarks/checkpoint_overhead.py --save-costs-only --model examples.your_model:ResNet \\
        --model-kwargs '{"width": 64}'                                                          # 94 arrays, 15 MB

One warm-up run without a workdir comes first and is not counted (it fills
the OS file cache with the data set and the Python modules). ``--in-process``
runs everything in this process instead (compiled steps and imported modules
are then shared between runs, so it isolates the cost of the saves
themselves). Every run ends with :func:`save_costs`: what one save of the
model's state blocks the caller for, how long until it is on disk, and its
CPU time, in Orbax's format (the default) and as ``arrays.npz``;
``--save-costs-only`` measures only that.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def one_run(train_args: list[str], workdir: str | None, *, in_process: bool) -> dict:
    """Trains once with ``jaxnet train ... --json``; its summary.

    By default in a fresh ``python -m jaxnet`` process, as a user runs it (each
    run pays its own imports and compilation); ``in_process`` calls the CLI's
    code (``jaxnet.cli.run_train``) in this process instead, where the
    compiled step and the imported modules are reused between runs.
    """
    argv = ["train", *train_args, "--no-progress", "--json"] + (["--workdir", workdir] if workdir else [])
    if not in_process:
        done = subprocess.run(
            [sys.executable, "-m", "jaxnet", *argv], capture_output=True, text=True, cwd=ROOT, check=False
        )
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise SystemExit(f"`python -m jaxnet {' '.join(argv)}` failed: {last}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    from jaxnet import cli

    args = cli.build_parser().parse_args(argv)
    with contextlib.redirect_stderr(io.StringIO()):  # the per-epoch lines
        return cli.run_train(args)


def measure(train_args: list[str], pairs: int, *, in_process: bool = False) -> dict:
    """``pairs`` (without, with) pairs in ABBA order, after one uncounted warm-up run."""
    one_run(train_args, None, in_process=in_process)
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for i in range(pairs):
        order = ("without", "with") if i % 2 == 0 else ("with", "without")
        for kind in order:
            workdir = tempfile.mkdtemp(prefix="jaxnet-ckpt-bench-") if kind == "with" else None
            try:
                summary = one_run(train_args, workdir, in_process=in_process)
            finally:
                if workdir:
                    shutil.rmtree(workdir, ignore_errors=True)
            runs[kind].append(
                {
                    "train_seconds": summary["train_seconds"],
                    "checkpoint_seconds": summary.get("checkpoint_seconds", 0.0),
                    "test_accuracy": summary.get("test_accuracy"),
                    "load": round(os.getloadavg()[0], 2),
                }
            )
            print(
                f"pair {i + 1}/{pairs} {kind:>7}: train {summary['train_seconds']:.3f} s, "
                f"blocked in saves {summary.get('checkpoint_seconds', 0.0):.3f} s, "
                f"load {os.getloadavg()[0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
    ratios = [w["train_seconds"] / wo["train_seconds"] for w, wo in zip(runs["with"], runs["without"])]
    median_without = statistics.median(r["train_seconds"] for r in runs["without"])
    median_with = statistics.median(r["train_seconds"] for r in runs["with"])
    blocked = statistics.median(r["checkpoint_seconds"] for r in runs["with"])
    return {
        "args": train_args,
        "pairs": pairs,
        "mode": "in-process" if in_process else "one process per run",
        "runs": runs,
        "median_train_seconds_without": median_without,
        "median_train_seconds_with": median_with,
        "pair_ratios": [round(r, 4) for r in ratios],
        "overhead_percent": round(100 * (statistics.median(ratios) - 1), 2),
        "median_checkpoint_seconds": blocked,
        "blocked_percent": round(100 * blocked / median_with, 2),
    }


def save_costs(model: str, saves: int = 12, *, model_kwargs: dict | None = None) -> dict[str, dict[str, float]]:
    """What one :func:`jaxnet.checkpoint.save` costs, per array format: medians in ms.

    ``blocked_ms`` is what the caller (the training thread) waits for in
    ``save`` (the copy off the device and handing the copy to jaxnet's
    worker), ``write_ms`` the wall time from ``save`` until the step is
    committed (``wait`` returns), ``cpu_ms`` the CPU time of all threads over
    the same span: the load-independent part of the overhead, what each save
    takes from the training loop's cores. The model's freshly initialized
    state with Adam's moments, ``saves`` saves per format in two interleaved
    rounds (the first two of each round are warm-up).
    """
    import optax

    from jaxnet import checkpoint
    from jaxnet.models import build_model
    from jaxnet.state import create_train_state

    _, state = create_train_state(build_model(model, kwargs=model_kwargs), optax.adam(1e-3))
    samples: dict[str, dict[str, list[float]]] = {
        name: {"blocked_ms": [], "write_ms": [], "cpu_ms": []} for name in checkpoint.ARRAY_FORMATS
    }
    for array_format in checkpoint.ARRAY_FORMATS * 2:
        folder = tempfile.mkdtemp(prefix="jaxnet-ckpt-cost-")
        try:
            ckpt = checkpoint.create_checkpoint_manager(folder, array_format=array_format)
            for step in range(saves):
                start, cpu = time.perf_counter(), time.process_time()
                checkpoint.save(ckpt, step, state, meta={"epoch": step})
                blocked = time.perf_counter() - start
                checkpoint.wait(ckpt)
                if step >= 2:
                    sample = samples[array_format]
                    sample["blocked_ms"].append(1e3 * blocked)
                    sample["write_ms"].append(1e3 * (time.perf_counter() - start))
                    sample["cpu_ms"].append(1e3 * (time.process_time() - cpu))
            checkpoint.close(ckpt)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {
        name: {key: round(statistics.median(values), 2) for key, values in kinds.items()}
        for name, kinds in samples.items()
    }


def state_size(model: str, model_kwargs: dict | None = None) -> dict[str, float]:
    """The number of arrays and the MB of a model's TrainState with Adam (what a checkpoint holds)."""
    import jax
    import optax

    from jaxnet.checkpoint import integrity
    from jaxnet.models import build_model
    from jaxnet.state import create_train_state

    _, state = create_train_state(build_model(model, kwargs=model_kwargs), optax.adam(1e-3))
    leaves = jax.tree.leaves(integrity.key_data_tree(state))
    return {"arrays": len(leaves), "mb": round(sum(x.nbytes for x in leaves) / 1e6, 2)}


def print_save_costs(model: str, costs: dict[str, dict[str, float]], size: dict[str, float]) -> None:
    for name, cost in costs.items():
        print(
            f"{model} ({size['arrays']} arrays, {size['mb']} MB), {name}: blocked in save "
            f"{cost['blocked_ms']:.1f} ms, written in {cost['write_ms']:.1f} ms, CPU {cost['cpu_ms']:.1f} ms "
            "(medians per save)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/checkpoint_overhead.py",
        description="Training time of `jaxnet train` with a checkpoint at every epoch end vs without.",
    )
    parser.add_argument("--model", default="mlp", help="model name as in `jaxnet train --model` (default: mlp)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the model's recipe)")
    parser.add_argument("--pairs", type=int, default=5, help="(without, with) pairs to run (default: 5)")
    parser.add_argument("--data-dir", default=None, help="folder with mnist/ and cifar10/ (as for jaxnet train)")
    parser.add_argument("--no-download", action="store_true", help="never go online (embedded MNIST sample)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every training in this process (shares compilation and imports) "
        "instead of one `python -m jaxnet` process per run",
    )
    parser.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="keyword arguments of a package.module:factory --model, as for jaxnet train",
    )
    parser.add_argument("--saves", type=int, default=12, help="saves per array format and round (default: 12)")
    parser.add_argument(
        "--save-costs-only",
        action="store_true",
        help="only measure the cost of single saves in both array formats, no training runs",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.saves < 3:
        parser.error("--saves must be >= 3 (the first two of each round are warm-up)")
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    train_args = ["--model", args.model] + (["--model-kwargs", args.model_kwargs] if args.model_kwargs else [])
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    if args.data_dir:
        train_args += ["--data-dir", args.data_dir]
    if args.no_download:
        train_args.append("--no-download")
    if args.in_process:
        from jaxnet import cli

        cli._limit_malloc_arenas()  # as `jaxnet train` does before training
    result: dict = {"model": args.model, "model_kwargs": model_kwargs}
    if not args.save_costs_only:
        start = time.perf_counter()
        result.update(measure(train_args, args.pairs, in_process=args.in_process))
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"jaxnet train {' '.join(train_args)}: {args.pairs} pairs, "
            f"median train_seconds without {result['median_train_seconds_without']:.3f} s, "
            f"with a checkpoint every epoch {result['median_train_seconds_with']:.3f} s"
        )
        print(
            f"overhead (median of per-pair ratios): {result['overhead_percent']:+.1f}%; "
            f"pair ratios {result['pair_ratios']}"
        )
        print(
            f"time blocked in saves: {result['median_checkpoint_seconds']:.3f} s "
            f"({result['blocked_percent']:.1f}% of the training loop)"
        )
    result["state"] = state_size(args.model, model_kwargs)
    result["save_costs"] = save_costs(args.model, args.saves, model_kwargs=model_kwargs)
    print_save_costs(args.model, result["save_costs"], result["state"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
