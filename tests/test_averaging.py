"""EMA and lookahead against hand computation, and airbench's sync schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.averaging import ema_update, lookahead_decay, lookahead_init, lookahead_sync, sync_decay


def test_ema_update_is_the_lerp_of_every_float_leaf():
    avg = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(4.0, jnp.bfloat16), "count": jnp.array(3, jnp.int32)}
    new = {"w": jnp.array([3.0, 2.0]), "b": jnp.array(0.0, jnp.bfloat16), "count": jnp.array(7, jnp.int32)}
    out = ema_update(avg, new, 0.75)
    np.testing.assert_allclose(out["w"], [0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 2])  # [1.5, -1.0]
    assert out["b"].dtype == jnp.bfloat16 and float(out["b"]) == 3.0
    assert int(out["count"]) == 7  # not averaged: taken from the new values
    np.testing.assert_array_equal(ema_update(avg, new, 1.0)["w"], avg["w"])
    np.testing.assert_array_equal(ema_update(avg, new, 0.0)["w"], new["w"])


def test_lookahead_decay_is_airbenchs_cubic_ramp():
    assert float(lookahead_decay(5, 476)) == pytest.approx(0.95**5 * (5 / 476) ** 3, rel=1e-6)
    assert float(lookahead_decay(238, 476)) == pytest.approx(0.95**5 / 8, rel=1e-6)
    assert float(lookahead_decay(476, 476)) == pytest.approx(0.95**5, rel=1e-6)


def test_sync_decay_every_fifth_step_and_after_the_last():
    syncs = {t: sync_decay(t, 12) for t in range(1, 13)}
    assert [t for t, d in syncs.items() if d is not None] == [5, 10, 12]
    assert syncs[5] == pytest.approx(0.95**5 * (5 / 12) ** 3, rel=1e-6) and syncs[12] == 1.0
    # A last step on a multiple of 5: the scheduled sync; airbench's extra decay-1 sync then changes nothing.
    assert sync_decay(10, 10) == pytest.approx(0.95**5, rel=1e-6)
    assert [t for t in range(1, 8) if sync_decay(t, 7, every=3) is not None] == [3, 6, 7]
    # A run shorter than one interval never synced: no decay-1 sync back to the initial weights at its end.
    assert [t for t in range(1, 21) if sync_decay(t, 20, every=102) is not None] == []


def test_lookahead_sync_by_hand():
    state = lookahead_init({"w": jnp.array([1.0, 2.0])})
    state, fast = lookahead_sync(state, {"w": jnp.array([3.0, -2.0])}, 0.25)
    expected = [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2]  # [2.5, -1.0]
    np.testing.assert_allclose(state.average["w"], expected)
    np.testing.assert_allclose(fast["w"], expected)
    fast["w"].delete()  # a donated step may consume the fast weights: the average has buffers of its own
    np.testing.assert_allclose(state.average["w"], expected)


def test_a_run_of_fake_steps_matches_a_hand_rolled_airbench_loop():
    """Fast weights move by a fixed rule; every 5 steps and at the end they are pulled to the average."""
    total = 13
    fast, slow = 1.0, 1.0  # airbench: net and net_ema, plain floats
    params = {"w": jnp.array(1.0)}
    state = lookahead_init(params)
    update = jax.jit(lookahead_sync)
    for t in range(1, total + 1):
        fast = fast * 0.9 + t  # the "optimizer step"
        params = {"w": params["w"] * 0.9 + t}
        if t % 5 == 0 or t == total:
            d = 1.0 if t % 5 else 0.95**5 * (t / total) ** 3
            slow = slow + (1 - d) * (fast - slow)  # ema.lerp_(net, 1 - decay)
            fast = slow  # net.copy_(ema)
        decay = sync_decay(t, total)
        if decay is not None:
            state, params = update(state, params, decay)
        assert float(params["w"]) == pytest.approx(fast, rel=1e-6), t
    assert float(state.average["w"]) == pytest.approx(slow, rel=1e-6)


def test_the_speedruns_lookahead_syncs_after_as_many_examples_at_any_batch_size():
    from jaxnet.speedrun import SpeedrunRecipe

    # airbench: every 5 steps of 1024 examples; a smaller batch syncs after the same 5120 examples
    assert [SpeedrunRecipe(batch_size=b).sync_every for b in (1024, 512, 256, 100)] == [5, 10, 20, 51]
    assert SpeedrunRecipe(batch_size=8192).sync_every == 1  # never less than once per step
    syncs = [
        t for t in range(1, 1932) if sync_decay(t, 1931, every=SpeedrunRecipe(batch_size=256).sync_every) is not None
    ]
    assert len(syncs) == 1931 // 20 + 1 and syncs[-1] == 1931  # ~ airbench's 95 syncs + the final one
