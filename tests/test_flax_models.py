"""Models written as the Flax docs write them: checkpoints of their RNG keys, and mixed precision.

``Net`` is such a model: ``__call__(self, x)``, ``nnx.Dropout(0.1,
rngs=rngs)`` holding its own random stream (an ``nnx.RngKey`` of dtype
``key<fry>`` and an ``nnx.RngCount`` in ``TrainState.model_state``),
``nnx.BatchNorm`` and ``nnx.LayerNorm``.
"""

from __future__ import annotations

import hashlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import checkpoint as C
from jaxnet import precision as jprecision
from jaxnet.checkpoint import integrity
from jaxnet.data.dataset import ArrayDataset
from jaxnet.errors import ConfigError
from jaxnet.models import create_model
from jaxnet.parallel import sharding as jsharding
from jaxnet.state import create_train_state
from jaxnet.step import loss_for_output, train_step_fn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class ResBlock(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        return x + nnx.relu(self.bn(self.conv(x)))


class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.block = ResBlock(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):  # (B, 8, 8, 1) -> (B, 10)
        x = self.norm(self.dropout(self.block(self.stem(x))))
        return self.head(x.reshape(x.shape[0], -1))


def _key_of(model_state):
    return model_state["dropout"]["rngs"]["key"][...]


def _count_of(model_state):
    return int(model_state["dropout"]["rngs"]["count"][...])


def _trained_state(seed: int):
    """A Net state after one train step: its dropout stream has been drawn from."""
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(Net(rngs=nnx.Rngs(seed)), tx, seed=seed)
    step = jax.jit(train_step_fn(graphdef, tx, loss_for_output("logits")))
    batch = {"image": np.ones((4, 8, 8, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
    state, _ = step(state, batch)
    return state


def _tiny_data() -> ArrayDataset:
    rng = np.random.default_rng(0)

    def images(n):
        return rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)  # (N, H, W, C)

    return ArrayDataset(
        "tiny",
        images(96),
        rng.integers(0, 10, 96).astype(np.int32),
        images(32),
        rng.integers(0, 10, 32).astype(np.int32),
        10,
        (0.5,),
        (0.25,),
        "generated",
    )


def _equal_trees(a, b) -> bool:
    la, lb = jax.tree.leaves(integrity.key_data_tree(a)), jax.tree.leaves(integrity.key_data_tree(b))
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


# --- RNG keys in checkpoints -------------------------------------------------------------------


def test_the_state_holds_typed_keys():
    state = _trained_state(0)
    assert jax.dtypes.issubdtype(_key_of(state.model_state).dtype, jax.dtypes.prng_key)
    assert _count_of(state.model_state) == 1  # the train step drew one dropout key


def test_params_sha256_hashes_key_data():
    key = jax.random.key(3)
    data = np.asarray(jax.random.key_data(key))
    assert data.dtype == np.uint32
    assert integrity.params_sha256({"k": key}) == hashlib.sha256(data.tobytes()).hexdigest()
    assert integrity.params_sha256({"k": key}) != integrity.params_sha256({"k": jax.random.key(4)})
    state = _trained_state(0)
    digest = integrity.params_sha256(state)
    assert digest == integrity.params_sha256(jax.tree.map(np.asarray, integrity.key_data_tree(state)))
    other = state.replace(
        model_state=jax.tree.map(lambda x: jax.random.key(9) if integrity.is_prng_key(x) else x, state.model_state)
    )
    assert integrity.params_sha256(other) != digest
    record = integrity.make_record(state, {}, None)
    assert integrity.shapes_problem(record, state, ["model_state"]) is None
    assert integrity.shapes_problem(record, jax.eval_shape(lambda: state), ["model_state"]) is None


@pytest.mark.parametrize("array_format", ["npz", "orbax"])
def test_checkpoint_round_trip_keeps_the_key_data(array_format, tmp_path):
    saved = _trained_state(1)
    fresh = create_train_state(Net(rngs=nnx.Rngs(0)), optax.adam(1e-3))[1]  # another key: the target's is not kept
    assert not np.array_equal(
        jax.random.key_data(_key_of(fresh.model_state)), jax.random.key_data(_key_of(saved.model_state))
    )
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt", array_format=array_format)
    C.save(ckpt, 1, saved, meta={"epoch": 1})
    C.wait(ckpt)
    for target in (fresh, jax.eval_shape(lambda: fresh)):
        restored, meta = C.restore(ckpt, target)
        key = _key_of(restored.model_state)
        assert key.dtype == _key_of(saved.model_state).dtype  # a typed key again, of the same type
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(_key_of(saved.model_state)))
        assert _count_of(restored.model_state) == 1
        assert _equal_trees(restored, saved) and meta == {"epoch": 1}
        assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for target in ((fresh.params, fresh.model_state), jax.eval_shape(lambda: (fresh.params, fresh.model_state))):
        params, model_state, _ = C.restore_variables(ckpt, *target)
        assert _key_of(model_state).dtype == _key_of(saved.model_state).dtype
        np.testing.assert_array_equal(
            jax.random.key_data(_key_of(model_state)), jax.random.key_data(_key_of(saved.model_state))
        )
        assert _equal_trees(params, saved.params)
    C.close(ckpt)
    state_dir = tmp_path / "ckpt" / "1" / "state"
    if array_format == "npz":
        with np.load(state_dir / C.ARRAYS_FILE) as archive:  # readable without jaxnet, as uint32 key data
            np.testing.assert_array_equal(
                archive["model_state/dropout/rngs/key/value"], jax.random.key_data(_key_of(saved.model_state))
            )
    else:
        assert not (state_dir / C.ARRAYS_FILE).exists()


@pytest.mark.parametrize("array_format", ["npz", "orbax"])
def test_damaged_key_data_is_caught(array_format, tmp_path):
    saved = _trained_state(1)
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt", array_format=array_format)
    C.save(ckpt, 1, saved, meta={})
    C.close(ckpt)
    # The recorded digest covers the key: a restore whose key data differs is damage.
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt")
    record = C.read_record(ckpt, 1)
    changed = saved.replace(
        model_state=jax.tree.map(lambda x: jax.random.key(5) if integrity.is_prng_key(x) else x, saved.model_state)
    )
    assert integrity.digest_problem(record, changed, ["model_state"]) == "model_state"
    assert integrity.digest_problem(record, saved, ["model_state"]) is None
    C.close(ckpt)


@pytest.mark.parametrize("array_format", ["npz", "orbax"])
def test_sharded_restore_of_key_leaves(array_format, tmp_path):
    mesh = jsharding.make_mesh(8)
    state = _trained_state(2)
    state = jsharding.shard_state(state, jsharding.state_shardings(state, mesh))  # keys replicated
    keys = jax.device_put(jax.random.split(jax.random.key(7), 8), NamedSharding(mesh, P("data")))  # (8,) split
    tree = {"state": state, "keys": keys}
    ckpt = C.create_checkpoint_manager(tmp_path / "ckpt", array_format=array_format)
    C.save(ckpt, 1, tree, meta={})
    C.wait(ckpt)
    restored, _ = C.restore(ckpt, tree)
    C.close(ckpt)
    assert _equal_trees(restored, tree)
    assert restored["keys"].dtype == keys.dtype
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    assert len(restored["keys"].addressable_shards) == 8


def _fit(data, workdir=None, **kw):
    from jaxnet import fit

    return fit(Net(rngs=nnx.Rngs(0)), data, optax.adam(1e-2), batch_size=16, progress=False, workdir=workdir, **kw)


def test_fit_interrupted_mid_epoch_resumes_bit_identical(tmp_path):
    data = _tiny_data()  # 6 steps per epoch
    whole = _fit(data, epochs=2)
    assert _count_of(whole.state.model_state) == 12  # every step drew a dropout key from the model's stream
    _fit(data, tmp_path, epochs=1, checkpoint_every=4)
    # The run "dies" after its mid-epoch save at step 4: the epoch-end checkpoint never happened.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    resumed = _fit(data, tmp_path, epochs=2, checkpoint_every=4, resume=True)
    assert resumed.summary["resumed_from_step"] == 4
    assert resumed.summary["params_sha256"] == whole.summary["params_sha256"]
    assert _equal_trees(resumed.state, whole.state)  # RNG key, count and BatchNorm statistics too


def test_sharded_fit_resumes_bit_identical(tmp_path):
    data = _tiny_data()
    whole = _fit(data, epochs=2, devices=2)
    _fit(data, tmp_path, epochs=1, devices=2)
    resumed = _fit(data, tmp_path, epochs=2, devices=2, resume=True)
    assert resumed.summary["resumed_from_step"] == 6
    assert resumed.summary["params_sha256"] == whole.summary["params_sha256"]
    assert _equal_trees(resumed.state.model_state, whole.state.model_state)


# --- mixed precision ---------------------------------------------------------------------------


def _operand_dtypes(jaxpr, names=("dot_general", "conv_general_dilated")) -> set[str]:
    """Dtypes of the operands of every matmul/convolution in a jaxpr, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.update(str(v.aval.dtype) for v in eqn.invars)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found |= _operand_dtypes(sub, names)
    return found


def _forward_jaxpr(model, x):
    graphdef, variables = nnx.split(model)

    def forward(variables, x):
        m = nnx.merge(graphdef, variables, copy=True)
        m.train()
        return m(x)

    return jax.make_jaxpr(forward)(variables, x)


def test_bf16_reaches_flax_layers():
    model = Net(rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8, 8, 1), jnp.bfloat16)
    # What the input cast alone gives: Flax's layers promote back to float32.
    assert _operand_dtypes(_forward_jaxpr(model, x).jaxpr) == {"float32"}
    copy = jprecision.apply_to_model(model, jprecision.get_policy("bf16"))
    jaxpr = _forward_jaxpr(copy, x)
    assert _operand_dtypes(jaxpr.jaxpr) == {"bfloat16"}
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    # Normalization statistics are reduced in float32.
    assert _operand_dtypes(jaxpr.jaxpr, ("reduce_sum",)) == {"float32"}
    copy.eval()
    assert copy.block.bn(jnp.ones((2, 8, 8, 4), jnp.bfloat16)).dtype == jnp.bfloat16


def test_bf16_train_step_keeps_float32_variables():
    policy = jprecision.get_policy("bf16")
    copy = jprecision.apply_to_model(Net(rngs=nnx.Rngs(0)), policy)
    tx = optax.adam(1e-3)
    graphdef, state = create_train_state(copy, tx)
    transform, loss_fn = jprecision.apply_policy(policy, None, loss_for_output("logits"))
    step = train_step_fn(graphdef, tx, loss_fn, transform=transform)
    batch = {"image": np.ones((4, 8, 8, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
    assert _operand_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr) == {"bfloat16"}  # forward and backward
    new_state, metrics = jax.jit(step)(state, batch)
    assert metrics["loss"].dtype == jnp.float32
    dtypes = lambda s: jax.tree.map(lambda a: a.dtype, integrity.key_data_tree(s))  # noqa: E731
    assert dtypes(new_state) == dtypes(state)
    assert {str(a.dtype) for a in jax.tree.leaves(new_state.params)} == {"float32"}
    assert {str(a.dtype) for a in jax.tree.leaves(new_state.model_state["block"])} == {"float32"}


def test_the_users_model_is_unchanged_and_takes_the_trained_variables_back():
    model = Net(rngs=nnx.Rngs(0))
    before = nnx.split(model)
    copy = jprecision.apply_to_model(model, jprecision.get_policy("bf16"))
    assert copy is not model and copy.head is not model.head
    assert model.head.dtype is None and model.block.bn.dtype is None and copy.head.dtype == jnp.bfloat16
    after = nnx.split(model)
    assert after[0] == before[0] and _equal_trees(after[1], before[1])  # graph and values as they were
    graphdef, params, model_state = nnx.split(copy, nnx.Param, ...)
    assert graphdef != before[0]  # dtype is static: it lives in the copy's graphdef ...
    _, orig_params, orig_model_state = nnx.split(model, nnx.Param, ...)
    assert jax.tree.structure(params) == jax.tree.structure(orig_params)  # ... not in the variables
    assert jax.tree.structure(model_state) == jax.tree.structure(orig_model_state)
    trained = jax.tree.map(lambda p: p + 1, params)
    nnx.update(model, trained, model_state)
    assert _equal_trees(nnx.split(model, nnx.Param, ...)[1], trained)
    model.eval()
    assert model(jnp.ones((2, 8, 8, 1), jnp.float32)).dtype == jnp.float32  # still a float32 model


class HandWritten(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x):
        return x @ self.w[...]


class WithDtype(HandWritten):
    def __init__(self, rngs: nnx.Rngs, dtype=None):
        super().__init__(rngs)
        self.dtype = dtype

    def __call__(self, x):
        x, w = nnx.nn.dtypes.promote_dtype((x, self.w[...]), dtype=self.dtype)
        return x @ w


class Outer(nnx.Module):
    def __init__(self, layer, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), layer(rngs)])

    def __call__(self, x):
        return self.layers[1](self.layers[0](x))


def test_a_hand_written_layer_is_refused_by_name():
    model = Outer(HandWritten, nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"model\.layers\.1 \(HandWritten\).*dtype attribute.*precision='fp32'"):
        jprecision.apply_to_model(model, jprecision.get_policy("bf16"))
    assert model.layers[0].dtype is None  # nothing was changed before refusing
    assert jprecision.apply_to_model(model, jprecision.get_policy("fp32")) is not model  # fp32: just a copy


def test_a_layer_with_a_dtype_attribute_and_jaxnets_own_layers_are_accepted():
    copy = jprecision.apply_to_model(Outer(WithDtype, nnx.Rngs(0)), jprecision.get_policy("fp16"))
    assert copy(jnp.ones((2, 4), jnp.float16)).dtype == jnp.float16
    for name in ("mlp", "convnet"):
        model = create_model(name)
        copy = jprecision.apply_to_model(model, jprecision.get_policy("bf16"))
        assert _equal_trees(nnx.split(copy)[1], nnx.split(model)[1])
