"""`transagent report`: seed statistics, HM of means, averages, the published column, unfinished runs, CSV, PNGs."""
import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.commands.report import report as report_cli
from pipelines.datasets import DATASETS
from pipelines.report import ReportError, find_runs, load_published, summarise, write_report

PAPER_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                  "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]


def hm(base, novel):
    return 2 * base * novel / (base + novel)


def make_run(root, dataset, protocol, shots, seed, accuracy, ablation="default", steps=6, gates=(), evals=None,
             finished=True, epochs=2):
    """A run directory as stage 2 writes it (config.json, metrics.jsonl, final.json, eval-*.json)."""
    directory = root / dataset / protocol / f"shots{shots}" / f"seed{seed}" / ablation
    directory.mkdir(parents=True)
    config = {"run": {"dataset": dataset, "protocol": protocol, "shots": shots, "seed": seed, "epochs": epochs},
              "preset": "tiny", "split_hash": "x", "classnames": ["a", "b"], "caches": {}}
    (directory / "config.json").write_text(json.dumps(config))
    with open(directory / "metrics.jsonl", "w") as handle:
        for step in range(steps):
            record = {"epoch": 1 + step * min(epochs, steps) // steps, "step": step, "lr": 0.002,
                      "ce": 2.0 / (1 + step + seed), "vac": 0.5 / (1 + step), "total": 3.0 / (1 + step)}
            for k, name in enumerate(gates):
                record[f"gate/vision/{name}"] = (0.3 + 0.1 * k + 0.01 * step) if k else 0.7 - 0.01 * step
            handle.write(json.dumps(record) + "\n")
    if finished:
        final = {"dataset": dataset, "protocol": protocol, "shots": shots, "seed": seed, "ablation": ablation,
                 "agents": list(gates), "epochs": epochs, "accuracy": accuracy, "train_seconds": 1.0,
                 "run_dir": str(directory)}
        (directory / "final.json").write_text(json.dumps(final))
    for target, value in (evals or {}).items():
        (directory / f"eval-{target}.json").write_text(json.dumps(
            {"run_dir": str(directory), "dataset": target, "accuracy": {"all": value}}))
    return directory


def b2n(base, novel):
    return {"base": base, "novel": novel, "hm": round(hm(base, novel), 4)}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (base, novel) in enumerate([(90.0, 70.0), (92.0, 74.0), (94.0, 72.0)], 1):
        make_run(root, "eurosat", "base2novel", 16, seed, b2n(base, novel), gates=("dino", "mae"))
    for seed, (base, novel) in enumerate([(80.0, 60.0), (82.0, 64.0)], 1):
        make_run(root, "dtd", "base2novel", 16, seed, b2n(base, novel))
    make_run(root, "eurosat", "base2novel", 16, 1, b2n(50.0, 40.0), ablation="agents-none-abc123")
    for shots, values in ((1, (70.0, 74.0)), (2, (80.0, 84.0))):
        for seed, value in enumerate(values, 1):
            make_run(root, "eurosat", "fewshot", shots, seed, {"all": value})
            make_run(root, "dtd", "fewshot", shots, seed, {"all": value - 20})
    for seed in (1, 2):
        make_run(root, "imagenet", "cross", 16, seed, {"all": 70.0 + seed},
                 evals={"caltech101": 90.0 + seed, "dtd": 40.0 + seed, "imagenet_v2": 60.0 + seed,
                        "imagenet": 1.0})
    make_run(root, "eurosat", "base2novel", 16, 4, {}, finished=False, steps=3, epochs=20)
    return root


def find(rows, **where):
    chosen = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
    assert len(chosen) == 1, (where, chosen)
    return chosen[0]


def test_base2novel_numbers_are_seed_means_and_hm_of_means(runs):
    finished, unfinished = find_runs(runs)
    rows = summarise(finished, load_published())
    base = find(rows, section="base2novel", dataset="eurosat", ablation="default", metric="base")
    novel = find(rows, section="base2novel", dataset="eurosat", ablation="default", metric="novel")
    h = find(rows, section="base2novel", dataset="eurosat", ablation="default", metric="hm")
    assert base.seeds == (1, 2, 3) and base.mean == pytest.approx(92.0) and novel.mean == pytest.approx(72.0)
    assert base.std == pytest.approx(np.std([90, 92, 94])) and novel.std == pytest.approx(np.std([70, 74, 72]))
    assert h.mean == pytest.approx(hm(92.0, 72.0))          # HM of the seed means, not the mean of HMs
    assert h.mean != pytest.approx(np.mean([hm(90, 70), hm(92, 74), hm(94, 72)]), abs=1e-6)
    assert h.std == pytest.approx(np.std([hm(90, 70), hm(92, 74), hm(94, 72)]))
    single = find(rows, section="base2novel", dataset="eurosat", ablation="agents-none-abc123", metric="base")
    assert single.mean == 50.0 and single.std is None and single.seeds == (1,)
    # the published TransAgent number, with its source, beside ours (16 shots only)
    assert base.paper == 97.43 and "[3rd-party]" in base.paper_source
    assert novel.paper is None and novel.paper_source == ""


def test_average_row_is_mean_over_datasets_and_hm_of_averages(runs):
    rows = summarise(find_runs(runs)[0], load_published())
    average = {m: find(rows, section="base2novel", dataset="Average", ablation="default", metric=m)
               for m in ("base", "novel", "hm")}
    assert average["base"].mean == pytest.approx((92.0 + 81.0) / 2)
    assert average["novel"].mean == pytest.approx((72.0 + 62.0) / 2)
    assert average["hm"].mean == pytest.approx(hm((92.0 + 81.0) / 2, (72.0 + 62.0) / 2))
    assert average["base"].members == ("dtd", "eurosat")
    # two datasets are not the paper's eleven: the paper column averages the same datasets' published numbers
    assert average["base"].paper == pytest.approx((97.43 + 84.37) / 2)
    assert average["base"].paper_source.startswith("mean over 2 datasets")
    assert average["novel"].paper is None and average["hm"].paper is None
    # one dataset in an ablation: no Average row for it
    assert not [r for r in rows if r.dataset == "Average" and r.ablation == "agents-none-abc123"]


def test_average_over_the_papers_eleven_datasets_gets_the_published_average(tmp_path):
    for i, dataset in enumerate(PAPER_DATASETS):
        make_run(tmp_path, dataset, "base2novel", 16, 1, b2n(80.0 + i, 70.0 + i), steps=1)
    rows = summarise(find_runs(tmp_path)[0], load_published())
    average = {m: find(rows, dataset="Average", metric=m) for m in ("base", "novel", "hm")}
    assert average["base"].mean == pytest.approx(85.0) and average["novel"].mean == pytest.approx(75.0)
    assert [average[m].paper for m in ("base", "novel", "hm")] == [85.29, 77.62, 81.27]
    assert average["hm"].paper_source == "TransAgent README [README]"


def test_fewshot_and_cross_dataset_rows(runs):
    rows = summarise(find_runs(runs)[0], load_published())
    one = find(rows, section="fewshot", dataset="eurosat", shots=1, metric="all")
    assert one.mean == pytest.approx(72.0) and one.std == pytest.approx(2.0) and one.seeds == (1, 2)
    assert one.paper == 75.5 and "few-shot.png" in one.paper_source
    assert find(rows, section="fewshot", dataset="dtd", shots=2).paper == 59.6
    average = find(rows, section="fewshot", dataset="Average", shots=2)
    assert average.mean == pytest.approx((82.0 + 62.0) / 2)
    assert average.paper == pytest.approx((83.6 + 59.6) / 2)   # 2 of 11 datasets: not the published average
    assert find(rows, section="cross", dataset="imagenet", target="caltech101").mean == pytest.approx(91.5)
    assert find(rows, section="cross", dataset="imagenet", target="imagenet").mean == pytest.approx(71.5)
    assert find(rows, section="cross", dataset="imagenet", target="Average").mean == pytest.approx((91.5 + 41.5) / 2)
    dg = find(rows, section="dg", dataset="imagenet", target="imagenet_v2")
    assert dg.mean == pytest.approx(61.5) and dg.paper is None
    assert not [r for r in rows if r.target == "imagenet" and r.metric == "all" and r.mean == 1.0]  # own re-eval


def test_write_report_tables_csv_unfinished_and_plots(runs, tmp_path):
    out = tmp_path / "out"
    result = write_report(runs, out)
    assert [u.seed for u in result.unfinished] == [4] and result.unfinished[0].epochs_done == 3
    assert find(result.rows, section="base2novel", dataset="eurosat", ablation="default", metric="base").seeds == \
        (1, 2, 3)                                      # the unfinished seed 4 is not counted
    markdown = (out / "results.md").read_text()
    per_seed_hm = np.std([hm(90, 70), hm(92, 74), hm(94, 72)])
    assert (f"| eurosat | default | 1,2,3 | 92.00 ± 1.63 | 72.00 ± 1.63 | {hm(92, 72):.2f} ± {per_seed_hm:.2f} | "
            "97.43 / – / – |") in markdown
    assert "## Unfinished runs" in markdown and "3/20 epochs" in markdown
    assert "PromptSRC (ICCV'23) Table 1 [recalled]" in markdown      # the baselines, with their source
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    row = next(r for r in table if r["section"] == "base2novel" and r["dataset"] == "eurosat"
               and r["ablation"] == "default" and r["metric"] == "hm")
    assert float(row["mean"]) == pytest.approx(hm(92, 72), abs=1e-4) and row["seeds"] == "1;2;3"
    assert {"paper", "paper_source"} <= set(table[0])
    assert next(r for r in table if r["metric"] == "base" and r["dataset"] == "eurosat"
                and r["ablation"] == "default")["paper_source"].endswith("[unverified]")
    names = {path.name for path in result.plots}
    assert {"fewshot-eurosat.png", "fewshot-Average.png", "base2novel-eurosat-shots16.png",
            "base2novel-Average-shots16.png", "train-eurosat-base2novel-shots16-default.png",
            "train-eurosat-fewshot-shots1-default.png"} <= names
    for path in result.plots:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 100 and pixels.var() > 0, path
        assert f"(plots/{path.name})" in markdown


def test_bad_runs_directories_give_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        find_runs(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        find_runs(tmp_path / "file")
    (tmp_path / "empty" / "eurosat").mkdir(parents=True)
    with pytest.raises(ReportError, match="no run directories"):
        find_runs(tmp_path / "empty")
    broken = make_run(tmp_path / "broken", "eurosat", "base2novel", 16, 1, b2n(1, 1))
    (broken / "final.json").write_text("{not json")
    with pytest.raises(ReportError, match="final.json"):
        find_runs(tmp_path / "broken")
    make_run(tmp_path / "nonovel", "eurosat", "base2novel", 16, 1, {"base": 1.0})
    with pytest.raises(ReportError, match="novel"):
        find_runs(tmp_path / "nonovel")
    result = CliRunner().invoke(report_cli, [str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_the_same_seed_twice_is_an_error(tmp_path):
    make_run(tmp_path / "a", "eurosat", "fewshot", 1, 1, {"all": 1.0})
    make_run(tmp_path / "b", "eurosat", "fewshot", 1, 1, {"all": 2.0})
    with pytest.raises(ReportError, match="two finished runs"):
        summarise(find_runs(tmp_path)[0], load_published())


def test_cli_writes_into_out(runs, tmp_path):
    result = CliRunner().invoke(report_cli, [str(runs), "--out", str(tmp_path / "r"), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "results.md").exists() and (tmp_path / "r" / "results.csv").exists()
    assert not (tmp_path / "r" / "plots").exists()
    assert "11 finished" not in result.output and "1 unfinished" in result.output


def test_published_numbers_are_consistent_and_sourced():
    published = load_published()
    names = {d.name if hasattr(d, "name") else d for d in DATASETS}
    assert set(published["average_over"]) == set(PAPER_DATASETS) <= names
    b2n_methods = published["base2novel"]["methods"]
    assert b2n_methods["TransAgent"]["average"] == {"base": 85.29, "novel": 77.62, "hm": 81.27,
                                                     "source": "TransAgent README [README]"}
    for method, records in b2n_methods.items():
        for dataset, record in records.items():
            assert dataset in names or dataset == "average"
            assert any(tag in record["source"] for tag in ("[recalled]", "[README]", "[3rd-party]", "issue #3"))
            if "hm" in record:     # a transcription error would break HM consistency
                assert hm(record["base"], record["novel"]) == pytest.approx(record["hm"], abs=0.011), (method, dataset)
        if all(d in records for d in PAPER_DATASETS):   # and the published averages
            for metric in ("base", "novel"):
                mean = np.mean([records[d][metric] for d in PAPER_DATASETS])
                assert mean == pytest.approx(records["average"][metric], abs=0.006), (method, metric)
    for records in published["fewshot"]["methods"].values():
        for dataset, record in records.items():
            assert "few-shot.png" in record["source"] and (dataset in names or dataset == "average")
            assert all(key.isdigit() for key in record if key != "source")
    assert published["cross"]["methods"] == {} and published["dg"]["methods"] == {}   # unreported (§8.4)
