"""The lessons in examples/ run top to bottom and show what they claim; every tutorial row is covered."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

from tests.helpers import EXAMPLES, HAVE_TORCH, REPO, import_file

TUTORIAL_MAP = REPO.parent / "shared" / "TUTORIAL_MAP.md"  # beside the repository, never inside it
LESSONS = ("01_tensors", "02_autograd", "03_dynamic_vs_static")
TABLES = ("Tensors", "Autograd", "Dynamic graph vs static graph")  # TUTORIAL_MAP.md sections covered here


def load(name: str):
    return import_file(EXAMPLES / f"{name}.py", f"lesson_{name}")


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[dict, str]]:
    """Each lesson's ``main(quick=True)`` results and everything it printed."""
    out = {}
    for name in LESSONS:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            results = load(name).main(quick=True)
        out[name] = (results, buffer.getvalue())
    return out


def tutorial_rows(path: pathlib.Path) -> dict[str, list[str]]:
    """The left cells of the Tensors, Autograd and Dynamic-vs-static tables of TUTORIAL_MAP.md."""
    rows: dict[str, list[str]] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = next((t for t in TABLES if line[3:].startswith(t)), None)
        elif section and line.startswith("|") and not re.match(r"\|\s*(-|tutorial)", line):
            rows.setdefault(section, []).append(line.split("|")[1].strip())
    return rows


def test_every_tutorial_row_is_tagged_in_a_lesson_and_printed_by_its_run(runs):
    if not TUTORIAL_MAP.is_file():
        pytest.skip(f"{TUTORIAL_MAP} not found")
    rows = tutorial_rows(TUTORIAL_MAP)
    assert set(rows) == set(TABLES) and sum(map(len, rows.values())) >= 15
    sources = {name: (EXAMPLES / f"{name}.py").read_text(encoding="utf-8") for name in LESSONS}
    for table, cells in rows.items():
        for cell in cells:
            tagged = [name for name, src in sources.items() if f"# Tutorial row: {cell}\n" in src]
            assert tagged, f"no lesson is tagged with the {table} row {cell!r}"
            assert cell in runs[tagged[0]][1], f"{tagged[0]} did not print the section for {cell!r}"


def test_tensors_lesson(runs):
    r, printed = runs["01_tensors"]
    assert r["creation"]["int_dtype"] == "int32" and r["creation"]["same_key_same_numbers"]
    assert r["arithmetic"]["int_mean"] == 2.0 and r["arithmetic"]["int_mean_dtype"] == "float32"
    assert r["reshaping"] == {"in_place_write_error": "TypeError", "at_set": 100.0, "original_kept": 0.0}
    assert r["joining"]["cat0"] == (4, 3) and r["joining"]["cat1"] == (2, 6) and r["joining"]["broadcast"] == (3, 4)
    m = r["masking"]
    assert m["masked"] == [5.0, 7.0, 4.0] and m["jit_mask_error"] == "NonConcreteBooleanIndexError"
    assert m["where"] == [0.0, 5.0, 0.0, 7.0, 4.0] and m["nonzero"] == [1, 3, 4] and m["masked_sum"] == 16.0
    assert m["padded_shape"] == (1, 4, 6)
    d = r["devices"]
    assert len(d["shard_shapes"]) == d["num_devices"] and len(set(d["shard_shapes"])) == 1
    if HAVE_TORCH:
        assert r["creation"]["torch_int_dtype"] == "torch.int64"
        assert r["arithmetic"]["torch_int_mean_error"].startswith("mean(): could not infer output dtype")
        assert "Same numbers as torch: 5 of 5 checks (all match)" in printed


def test_autograd_lesson(runs):
    r, printed = runs["02_autograd"]
    assert r["gradients"]["grad_at_3"] == 6.0 and r["gradients"]["per_example"] == [0.0, 2.0, 4.0, 6.0]
    assert r["stopping"]["stop_gradient_grad"] == 3.0
    assert r["accumulation"]["grad_twice"] == [6.0, 6.0] and r["accumulation"]["multisteps_diff"] < 1e-6
    assert abs(r["manual_update"]["w"] - 2.0) < 0.2 and r["manual_update"]["loss"] < 0.1
    if HAVE_TORCH:
        assert r["accumulation"]["torch_accumulated"] == 12.0
        assert not r["stopping"]["torch_no_grad_requires_grad"]
        assert "Same numbers as torch: 3 of 3 sections (all match)" in printed


def test_dynamic_vs_static_lesson(runs):
    r, printed = runs["03_dynamic_vs_static"]
    branch = r["if_on_values"]
    assert branch["jit_error"].startswith("TracerBoolConversionError")
    assert branch["variants"]["lax.cond"]["compiles"] == 1 and branch["variants"]["jnp.where"]["compiles"] == 1
    assert branch["variants"]["static bool, host sync"]["compiles"] == 2  # one program per branch
    assert all(v.get("matches_python_if", True) for v in branch["variants"].values())

    depth = r["random_depth"]
    assert depth["scan_matches_loop"] and "Reverse-mode differentiation does not work" in depth["fori_grad_error"]
    assert depth["retrace per depth"]["compiles"] == 5  # 20 random depths in 1..5: one program per depth
    assert depth["lax.scan + mask"]["compiles"] == 1

    text = r["variable_length"]
    assert text["mask_matches_unpadded"]
    assert text["2 length buckets"]["compiles"] == text["2 length buckets"]["distinct_shapes"] == 2
    assert text["pad to batch max"]["compiles"] == text["pad to batch max"]["distinct_shapes"] >= 1
    if HAVE_TORCH:
        assert text["torch per-sentence"]["steps_per_sec"] > 0 and depth["torch eager"]["steps_per_sec"] > 0

    debug = r["printing"]
    assert debug["python_print_calls_jitted"] == 1 and debug["python_print_saw_tracer"]
    assert debug["debug_print_calls"] == 3 and "jax.debug.print sees: 1.6829" in printed  # 2 sin(1)

    fused = r["optimized_globally"]
    assert fused["compiled_kernels"] < fused["stablehlo_ops"] and fused["jit_matches_eager"]
    assert fused["export_matches"] and fused["export_bytes"] > 0
