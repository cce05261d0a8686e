"""The default checkpoint is Orbax's own: plain orbax-checkpoint restores what ``fit`` writes, without jaxnet."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from jaxnet import checkpoint as C
from jaxnet.checkpoint import arrays, integrity
from jaxnet.checkpoint import workdir as W
from tests.helpers import REPO

# Run in a fresh interpreter in which `import jaxnet` fails: only Orbax, JAX and NumPy.
_PLAIN_ORBAX = textwrap.dedent("""
    import json, sys
    sys.modules["jaxnet"] = None  # any import of jaxnet or of a jaxnet.* module raises ImportError
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory, step, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        import jaxnet.checkpoint
    except ImportError:
        pass
    else:
        raise SystemExit("jaxnet could be imported")

    def flat(tree):
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    items = ocp.CheckpointManager(directory).restore(step)  # every item, by the handlers its metadata names
    alone = ocp.StandardCheckpointer().restore(f"{directory}/{step}/state")
    np.savez(out, **{f"manager/{k}": v for k, v in flat(items.state).items()},
             **{f"standard/{k}": v for k, v in flat(alone).items()})
    loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.startswith("jaxnet"))
    print(json.dumps({"meta": items.meta["meta"], "jaxnet_modules": loaded}))
""")


def test_plain_orbax_restores_a_default_fit_checkpoint_with_jaxnet_blocked(tmp_path):
    from jaxnet import create_model, create_optimizer, fit
    from jaxnet.data import load_dataset

    data = load_dataset("mnist", download=False)
    data = dataclasses.replace(
        data,
        train_images=data.train_images[:256],
        train_labels=data.train_labels[:256],
        test_images=data.test_images[:128],
        test_labels=data.test_labels[:128],
    )
    result = fit(
        create_model("mlp128"),
        data,
        create_optimizer("adam", 1e-3),
        epochs=1,
        batch_size=64,
        workdir=tmp_path / "w",
        progress=False,
    )
    directory = W.checkpoint_directory(tmp_path / "w")
    ckpt = C.create_checkpoint_manager(directory, read_only=True)
    step = C.latest(ckpt)
    meta = C.read_record(ckpt, step)["meta"]
    C.close(ckpt)
    assert step == 4 and not (directory / str(step) / "state" / C.ARRAYS_FILE).exists()

    out = tmp_path / "plain.npz"
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_ORBAX, str(directory), str(step), str(out)],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"meta": meta, "jaxnet_modules": []}

    # What was saved: the run's final state, typed PRNG keys as their key data.
    saved = {
        arrays.path_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(integrity.key_data_tree(result.state))[0]
    }
    with np.load(out) as plain:
        for way in ("manager", "standard"):
            got = {k.split("/", 1)[1]: plain[k] for k in plain.files if k.startswith(f"{way}/")}
            assert sorted(got) == sorted(saved), way
            for name, array in saved.items():
                assert got[name].dtype == array.dtype and np.array_equal(got[name], array), (way, name)
