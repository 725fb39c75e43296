"""BENCHMARKS.md is generated from benchmarks/results/*.json: it must be current, and a result file
that breaks the schema is named, not rendered."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import report  # noqa: E402

MEASURED = {
    "title": "Widget speed, CPU", "measures": "Widgets per second.", "command": "python benchmarks/widgets.py",
    "machine": "2 CPU cores", "tables": [{"columns": ["size", "widgets/s"], "rows": [[1, 2.5], [2, 12345.6]]}],
    "reading": "Twice the size, many more widgets.",
}
PENDING = {"title": "Widget speed, CUDA", "measures": "Widgets per second.", "order": 5,
           "command": "python benchmarks/widgets.py --device cuda", "machine": "one GPU", "status": "pending",
           "pending": "no GPU yet"}


def test_benchmarks_md_is_generated_from_the_result_files():
    assert report.main(["--check", str(REPO / "BENCHMARKS.md")]) == 0, \
        "BENCHMARKS.md is stale: python benchmarks/report.py --write BENCHMARKS.md"


def test_a_dropped_result_file_becomes_a_section(tmp_path):
    results = tmp_path / "results"
    report.write_section(results / "widgets_cpu.json", dict(MEASURED))
    report.write_section(results / "widgets_cuda.json", dict(PENDING))
    text = report.render(results)
    # Order: the pending section says order 5, before the default 100; the overview links both.
    assert text.index("## Widget speed, CUDA") < text.index("## Widget speed, CPU")
    assert "| [Widget speed, CPU](#widget-speed-cpu) | measured | 2 CPU cores |" in text
    assert "**Pending:** no GPU yet" in text and "python benchmarks/widgets.py --device cuda" in text
    assert "| 2 | 12,346 |" in text and "**Reading:** Twice the size" in text
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results-dir", str(results), "--check", str(out)]) == 1  # missing: stale
    assert report.main(["--results-dir", str(results), "--write", str(out)]) == 0
    assert report.main(["--results-dir", str(results), "--check", str(out)]) == 0
    # A rerun of the benchmark replaces the numbers and keeps the human-written reading.
    rerun = {k: v for k, v in MEASURED.items() if k != "reading"}
    rerun["tables"] = [{"columns": ["size", "widgets/s"], "rows": [[1, 3.0]]}]
    report.write_section(results / "widgets_cpu.json", rerun)
    assert json.loads((results / "widgets_cpu.json").read_text())["reading"] == MEASURED["reading"]
    assert report.main(["--results-dir", str(results), "--check", str(out)]) == 1


@pytest.mark.parametrize("change, message", [
    ({"command": ""}, "'command' is required"),
    ({"reading": None}, "one-line 'reading'"),
    ({"reading": "two\nlines"}, "'reading' is one line"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"status": "pending"}, "says in 'pending'"),
    ({"tables": [{"columns": ["a", "b"], "rows": [[1]]}]}, "tables[0].rows[0]: 2 cells expected"),
])
def test_a_result_file_off_the_schema_is_named(tmp_path, capsys, change, message):
    section = {k: v for k, v in {**MEASURED, **change}.items() if v is not None}
    (tmp_path / "bad.json").write_text(json.dumps(section))
    assert report.main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and message in err
