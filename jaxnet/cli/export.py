"""``jaxnet export`` and ``jaxnet predict``: a run's model as one file, and that file run on inputs.

The work is :mod:`jaxnet.export`'s (:func:`~jaxnet.export.export_workdir`,
:func:`~jaxnet.export.load_exported`); these commands parse, write the file
atomically and print.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from jaxnet.cli.converters import add_command, checkpoint_step, platform_list
from jaxnet.errors import ConfigError
from jaxnet.outputs import CLASSIFIER_KINDS


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``jaxnet export`` and ``jaxnet predict`` to the ``jaxnet`` parser.

    Each subcommand's ``func`` prints its own output and returns ``None``.
    """
    p = add_command(
        subparsers,
        "export",
        help="serialize a trained run's model for deployment (jax.export)",
        description="Restore a run's checkpoint and write its predict function, preprocessing "
        "and weights included, as one file that runs without jaxnet's model code. Works "
        "for any run, from jaxnet train or jaxnet.fit: the function recorded in W/model/, "
        "else the model rebuilt from W/config.json.",
    )
    p.add_argument("--workdir", required=True, help="the run's --workdir (config.json and checkpoints/)")
    p.add_argument("--out", required=True, help="file to write, e.g. model.jaxexport")
    p.add_argument(
        "--step",
        type=checkpoint_step,
        default="best",
        help="checkpoint to export: best (by test accuracy, else latest), latest, or a step number",
    )
    p.add_argument(
        "--platforms", type=platform_list, default=("cpu", "cuda"), help="comma-separated platforms to lower for"
    )
    p.set_defaults(func=run_export)
    q = add_command(
        subparsers,
        "predict",
        help="classify .npy or PNG files with an exported model",
        description="Load a model.jaxexport (no model code needed) and print, per example, "
        "the file, the predicted class and its probability (a regression model: its "
        "values). .npy files hold images or, for a model of float inputs, feature rows.",
    )
    q.add_argument("--model", required=True, help="the exported model file")
    q.add_argument("files", nargs="+", help=".npy arrays (one example or a batch) or image files")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    q.set_defaults(func=run_predict)


def run_export(args: argparse.Namespace) -> None:
    """``jaxnet export``: writes ``--step`` of ``--workdir`` to ``--out`` (:func:`jaxnet.export.export_workdir`)."""
    from jaxnet.export import export_workdir

    data, info = export_workdir(args.workdir, step=args.step, platforms=args.platforms)
    out = pathlib.Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable path") from None
    meta, shape = info["metadata"], ", ".join(map(str, info["input_shape"]))
    print(
        f"exported {meta['model']} (checkpoint step {meta['step']}) to {out}: {len(data)} bytes, platforms "
        f"{', '.join(info['platforms'])}, input {info['input_dtype']} (N, {shape}), output {info['output']}"
    )


def run_predict(args: argparse.Namespace) -> None:
    """``jaxnet predict``: prints ``file<TAB>class<TAB>probability`` per example (or JSON).

    A regression model prints ``file<TAB>value[,value...]`` instead.
    """
    from jaxnet.export import load_exported, predict_files, predict_values

    model = load_exported(args.model)
    if model.info["output"] not in CLASSIFIER_KINDS:
        values = predict_values(model, args.files)
        if args.json:
            print(
                json.dumps(
                    {
                        "model": str(args.model),
                        "predictions": [{"file": name, "values": [float(x) for x in v]} for name, v in values],
                    }
                )
            )
            return
        for name, v in values:
            print(f"{name}\t{','.join(f'{float(x):.6g}' for x in v)}")
        return
    results = predict_files(model, args.files)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "predictions": [
                        {
                            "file": name,
                            "class": cls,
                            "probability": float(p[cls]),
                            "probabilities": [float(v) for v in p],
                        }
                        for name, cls, p in results
                    ],
                }
            )
        )
        return
    for name, cls, p in results:
        print(f"{name}\t{cls}\t{p[cls]:.4f}")
