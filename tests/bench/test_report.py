"""jaxnet.bench.report: the result's schema, and the JSON, Markdown, charts and page written from it."""

from __future__ import annotations

import copy
import json

from jaxnet.bench import report
from tests.bench.helpers import run_cli


def test_quick_bench_writes_json_markdown_charts_and_the_page(quick_run):
    result, _, out = quick_run
    assert json.loads((out / "bench.json").read_text()) == result
    assert (out / "bench.md").read_text().startswith("| model |")
    assert (out / "bench_steps_per_sec.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "static_vs_dynamic.md").read_text()
    assert "# Static vs dynamic, measured" in page and result["machine"]["cpu"] in page
    assert "![" in page and "bench_steps_per_sec.png" in page
    assert "Compilations during the timed repeats of the jax variants: none" in page


def test_render_rewrites_the_outputs_of_an_earlier_run_without_measuring(quick_run, tmp_path):
    result, stdout, out = quick_run
    code, rendered, err = run_cli(["bench", "--render", str(out / "bench.json"), "--out", str(tmp_path)])
    assert code == 0, err
    assert rendered == report.markdown_tables(result) and "round 1" not in err  # nothing was timed
    assert (tmp_path / "static_vs_dynamic.md").read_text() == (out / "static_vs_dynamic.md").read_text()
    (tmp_path / "broken.json").write_text("{")
    code, _, err = run_cli(["bench", "--render", str(tmp_path / "broken.json")])
    assert code == 2 and "is not a bench.json" in err


def test_the_schema_rejects_what_it_should(quick_run):
    result = quick_run[0]
    bad = copy.deepcopy(result)
    del bad["rows"][0]["steps_per_sec"]
    bad["rows"][-1]["variant"] = "jax-pmap"
    bad["rows"][-1]["batch_size"] = "64"
    bad["machine"]["cores"] = 0
    errors = report.validate(bad)
    assert any("missing required key 'steps_per_sec'" in e for e in errors)
    assert any("'jax-pmap' is not one of" in e for e in errors)
    assert any("batch_size: expected integer" in e for e in errors)
    assert any("cores: 0 is below the minimum" in e for e in errors)
    assert "$.rows: expected array, got str 'no'" in report.validate({"rows": "no"})
