"""The benchmark harness at tiny shapes: it runs end to end through the CLI and its pieces measure what they claim.

No timing assertions: the numbers depend on the machine. The real-shape run is `make bench` (`transagent bench`).
"""
import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.agents.base import LoadRequest
from pipelines.bench import agents, fixtures, gpu, harness, plans, report, scaling, stage2, zoo
from pipelines.bench_workers import PeakMemory
from pipelines.cli import main


def test_smoke_run_writes_every_item(tmp_path):
    out = tmp_path / "bench" / "results.json"
    result = CliRunner().invoke(main, ["bench", "--plan", "smoke", "--device", "cpu", "--output", str(out),
                                       "--work-dir", str(tmp_path / "work")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["plan"] == "smoke" and written["machine"]["cpu"] and written["machine"]["torch"]
    results = {r["key"]: r for r in written["results"]}
    assert {r["item"] for r in written["results"]} == {1, 2, 3, 4, 5}
    for key in ("stage2_time_overhead", "live_official_speedup", "live_nograd_speedup", "extract_vs_forward",
                "repeat_extract_seconds", "cache_read_zarr", "cache_read_hdf5", "scaling_8", "scaling_16"):
        assert results[key]["value"] > 0, key
    for r in written["results"]:
        assert r["verdict"] in ("pass", "MISS", "within noise", "info")
        assert bool(r["reason"]) == (r["verdict"] in ("MISS", "within noise")), r["key"]
    for key in ("stage2_time_overhead", "live_official_speedup", "extract_vs_forward", "cache_read_zarr"):
        spread = results[key]["spread"]   # every comparison carries its paired ratios' range
        assert spread["count"] == plans.PLANS["smoke"].reps and spread["low"] <= spread["median"] <= spread["high"]
    # the cached variant's memory came from a fresh process; the smoke plan skips the other variants' processes
    memory = written["raw"]["stage2"]["memory"]
    assert set(memory) == {"cached"} and min(memory["cached"]["peak_bytes"]) > 0
    assert results["stage2_memory_overhead"]["verdict"] == "info"
    # a second extract over a complete cache never imports torch
    assert results["repeat_extract_model_loaded"]["value"] == 0.0
    assert "1 already complete" in written["raw"]["repeat_extract"]["output"]
    assert [row["rows"] for row in written["raw"]["scaling"]["table"]] == [8, 16]
    assert written["raw"]["extraction"]["statuses"] == ["done"] * (1 + plans.PLANS["smoke"].reps)
    assert list((tmp_path / "work").iterdir()) == []  # the scratch caches are removed
    assert "verdict" in result.output and str(out) in result.output


def test_gpu_section_runs_its_own_code_at_tiny_shapes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    ran = gpu.run_gpu("smoke", out, tmp_path / "work", device="cpu")
    assert json.loads(out.read_text())["table"] == ran["table"]
    assert list(ran["stage2"]) == list(gpu.GPU_PLANS["smoke"].variants) and not ran["skipped"]
    for row in ran["stage2"].values():
        assert row["ms_per_step"]["median"] > 0 and row["images_per_second"] > 0
    extraction = ran["extraction"]
    assert list(extraction) == list(gpu.GPU_PLANS["smoke"].agents)
    for agent, row in extraction.items():   # every loading path of the GPU run built its model and wrote rows
        assert row["rows"] > 0 and set(row["statuses"]) == {"done"}, (agent, row)
    assert extraction["dino"]["vs_forward"]["median"] > 0
    assert "vicuna (7B" in ran["table"] and "ms/step" in ran["table"] and len(ran["table"].splitlines()) < 40
    assert ran["preflight"]["missing"] == [] and list((tmp_path / "work").iterdir()) == []


def test_zoo_builders_make_each_agents_runtime_from_its_tiny_configuration():
    request = LoadRequest(tiny=True, student=fixtures.student_info(plans.TINY), device="cpu", dtype="bfloat16")
    agents.register_tiny(plans.TINY)
    for name in zoo.BUILDERS:   # the GPU section builds these at real size with the same code
        runtime = zoo.random_spec(name, real=False).load(request)
        assert type(runtime).__module__ == f"extract.agents.{name}", name


def test_gpu_extraction_goes_on_past_a_failing_or_unavailable_agent(tmp_path, monkeypatch):
    def extract(gplan, spec, *args):
        if spec.name == "bert":
            raise RuntimeError("CUDA out of memory")
        return {"rows": 2, "ms_per_row": 1.0, "statuses": ["done"]}

    monkeypatch.setattr(gpu, "_extract_agent", extract)
    saved = []
    plan = dataclasses.replace(gpu.GPU_PLANS["smoke"], agents=("dino", "bert", "sd", "pixart", "blip2"))
    out = gpu.extraction_per_agent(plan, tmp_path, "cpu", {"missing": ["diffusers"]}, float("inf"), saved.append)
    assert out["bert"]["failed"] == "RuntimeError: CUDA out of memory"
    assert out["sd"] == out["pixart"] == {"skipped": "missing diffusers"}
    assert out["dino"]["rows"] == out["blip2"]["rows"] == 2 and len(saved) == 3   # saved after each agent run


def test_gpu_preflight_names_the_wheels_to_carry(monkeypatch):
    monkeypatch.setattr(gpu, "missing_libraries", lambda: ["diffusers", "open_clip"])
    found = gpu.preflight(None)
    assert found["missing"] == ["diffusers", "open_clip"]
    assert "pip download -d wheels diffusers open_clip_torch" in found["carry"] and "--wheels" in found["carry"]


def test_interleaved_alternates_order_after_each_variants_warmup():
    calls = []
    times = harness.interleaved({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                                reps=3, warmup={"a": 2, "b": 0})
    assert calls == [("a", 0), ("a", 1), ("a", 2), ("b", 3), ("b", 4), ("a", 5), ("a", 6), ("b", 7)]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    assert harness.ratio_spread([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == harness.Spread(2.0, 1.0, 3.0, 3)
    with pytest.raises(ValueError):
        harness.ratio_spread([1.0, 2.0], [1.0])   # ratios pair rounds: both sides need every round


def test_plans_take_every_ratio_from_five_rounds_and_reads_from_a_real_cache_size():
    for name in ("full", "quick"):
        plan = plans.PLANS[name]
        assert plan.reps >= harness.MIN_REPETITIONS and plan.memory_steps >= harness.MIN_REPETITIONS, name
        assert plan.read_rows >= 1_000, name


def test_verdicts():
    def verdict(value, target, spread=None):
        return report.Result(1, "k", "label", value, "x", target, spread=spread).verdict

    assert verdict(1.05, "<= 1.10") == "pass" and verdict(1.2, "<= 1.10") == "MISS"
    assert verdict(3.5, ">= 3.5") == "pass" and verdict(2.9, "< 3") == "pass" and verdict(3.0, "< 3") == "MISS"
    assert verdict(None, "<= 1.10") == "info" and verdict(1.0, "") == "info"
    # a target inside the paired ratios' range is neither met nor missed
    assert verdict(1.08, "<= 1.10", harness.Spread(1.08, 1.04, 1.13, 5)) == "within noise"
    assert verdict(1.08, "<= 1.10", harness.Spread(1.08, 1.04, 1.09, 5)) == "pass"
    assert verdict(1.12, "<= 1.10", harness.Spread(1.12, 1.11, 1.15, 5)) == "MISS"
    spread = harness.Spread(1.08, 1.04, 1.13, 5)
    line = report.format_table([report.Result(1, "k", "label", 1.08, "x", "<= 1.10", "cpu", "why", spread=spread)])
    assert "1.04-1.13x (5)" in line and "within noise" in line and "why" in line


def test_peak_memory_sees_an_anonymous_allocation():
    with PeakMemory("cpu") as peak:
        start = peak.peak_anon
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        time.sleep(0.05)  # the sampler runs every 2 ms
        del block
    assert peak.peak_anon - start >= 48 * 2**20


def test_live_teachers_official_style_backpropagates_into_the_teachers():
    runtimes = agents.vision_runtimes(plans.TINY, "cpu")
    pixels = torch.rand(2, 3, plans.TINY.image_size, plans.TINY.image_size, generator=torch.Generator().manual_seed(0))
    frozen, frozen_means = stage2.live_vision_inputs(runtimes, pixels, official=False)
    live, live_means = stage2.live_vision_inputs(runtimes, pixels, official=True)
    assert set(live) == set(plans.VISION_AGENTS)
    for name in plans.VISION_AGENTS:
        assert not frozen[name].requires_grad and live[name].requires_grad
        assert live[name].shape == (2, 3, plans.TINY.tokens, plans.TINY.width)
        torch.testing.assert_close(live[name].detach(), frozen[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(live_means[name].detach(), frozen_means[name], atol=1e-5, rtol=0)
    sum(x.sum() for x in live.values()).backward()
    for runtime in runtimes.values():  # the gradient reached each teacher's first layer, its patch embedding
        patch_embedding = [p for name, p in runtime.model.named_parameters()
                           if name.endswith("projection.weight") and "neck" not in name]
        assert len(patch_embedding) == 1 and patch_embedding[0].grad is not None


@pytest.mark.parametrize("shapes", [plans.TINY, pytest.param(plans.VIT_B16, marks=pytest.mark.slow)])
def test_synthetic_rows_are_unit_tokens_of_the_student_shape(tmp_path, shapes):
    agents.register_tiny(shapes)
    paths = fixtures.write_synthetic_caches(tmp_path, shapes, rows=2, agents=("dino", "bert", "sd", "blip2"))
    bank = fixtures.open_bank(tmp_path, shapes, agents=("dino", "bert", "sd", "blip2"))
    tokens, means = bank.vision_batch(fixtures.cache_keys(2), [0, 0])
    assert tokens["dino"].shape == (2, shapes.layers, shapes.tokens, shapes.width)
    assert tokens["dino"].dtype == np.float16   # kept as cached; the loss widens one layer at a time
    wide = tokens["dino"].astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(wide, axis=-1), 1.0, atol=2e-3)
    np.testing.assert_allclose(means["dino"], wide.mean(axis=2), atol=1e-3)   # means were taken before fp16
    assert bank.relational["bert"].shape == (shapes.classes, plans.RELATIONAL_DIM)
    assert bank.multimodal_batch(fixtures.cache_keys(2))["sd"].shape == (2, shapes.classes)
    assert scaling.payload_per_row(paths["dino"]) == stage2.vision_row_bytes(shapes)


@pytest.mark.slow
def test_real_size_agents_emit_vit_b16_tokens():
    runtimes = agents.vision_runtimes(plans.VIT_B16, "cpu")
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens, means = stage2.live_vision_inputs(runtimes, pixels, official=False)
    for name in plans.VISION_AGENTS:
        assert tokens[name].shape == (1, 12, 196, 768) and means[name].shape == (1, 12, 768), name
        assert sum(p.numel() for p in runtimes[name].model.parameters()) > 80e6, name
