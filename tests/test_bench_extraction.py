"""The extraction figures at tiny shapes: every stage and the ratio are measured and shaped as `transagent bench`
reports them. No timing assertions: the numbers depend on the machine (the real-shape run is `make bench`)."""
import json

import pytest

from pipelines.bench.extraction_rows import TINY, Settings, extraction_figures, format_figures, verdict

STAGES = {"decode": "loader worker", "view": "loader worker", "normalise": "loader worker",
          "fp16": "writer thread", "hash": "writer thread", "write": "writer thread"}


def ordered(figure):
    return figure["min"] <= figure["median"] <= figure["max"]


def test_extraction_figures_at_tiny_shapes(tmp_path):
    figures = extraction_figures(quick=True, shapes=TINY, work=tmp_path, settings=Settings(rows=4, batch=2, reps=5))
    json.dumps(figures)   # JSON-ready, as bench/results.json holds it
    assert {name: figure["thread"] for name, figure in figures["stages_ms_per_row"].items()} == STAGES
    assert all(ordered(figure) for figure in figures["stages_ms_per_row"].values())
    assert ordered(figures["outside_forward_ms_per_row"]) and figures["target"] in ("pass", "miss", "within noise")
    assert figures["model_thread_ms_per_row"]["forward"]["min"] > 0
    ratio = figures["extraction_vs_forward"]
    assert len(ratio["extract_seconds"]) == len(ratio["compute_seconds"]) == len(ratio["forward_seconds"]) == 5
    for name in ("steady", "whole_run"):
        assert len(ratio[name]["ratios"]) == 5 and ordered(ratio[name]) and ratio[name]["min"] > 0
    assert ratio["steady"]["median"] > ratio["whole_run"]["median"] and ratio["rows"] == 4
    table = format_figures(figures)
    assert "extraction / bare forward" in table and all(name in table for name in STAGES)


def test_a_target_inside_the_spread_is_within_noise():
    assert verdict({"median": 9, "min": 8, "max": 9.5}, 10) == "pass"
    assert verdict({"median": 9, "min": 8, "max": 11}, 10) == "within noise"
    assert verdict({"median": 12, "min": 11, "max": 13}, 10) == "miss"
    with pytest.raises(ValueError, match="at least 5"):
        extraction_figures(settings=Settings(rows=4, batch=2, reps=3))
