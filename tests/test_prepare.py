"""`datasets prepare` and `extract` on an empty data root: downloads from a local http server through the
registry override file, published and pinned hashes, the Google Drive route, and the official description files.

The files served are a small EuroSAT-shaped archive and split file made here, and the real official EuroSAT
description files (tests/data/descriptions), so the shipped sha256 of both is checked for real."""
import functools
import hashlib
import io
import json
import logging
import subprocess
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.commands.datasets import datasets as datasets_cli
from pipelines.datasets import DATASETS, DatasetError, get_info, prepare
from pipelines.datasets.preparation import PINS_FILE, google_drive_id
from pipelines.messages import LOGGERS, show_library_messages

DATA = Path(__file__).parent / "data" / "descriptions"
FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
SPLIT_DRIVE_ID = "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"
COMMIT = "ff3439b701de310129dbd625564c4db655cf4769"


def eurosat_files(directory: Path, per_split=(2, 1, 1)) -> None:
    """EuroSAT.zip (2750/<class>/<class>_<i>.jpg, 16x16 JPGs), its CoOp split and the official description pair."""
    split, buffer = {"train": [], "val": [], "test": []}, io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, folder in enumerate(FOLDERS):
            index = 0
            for name, count in zip(split, per_split, strict=True):
                for _ in range(count):
                    key = f"{folder}/{folder}_{index}.jpg"
                    image = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image, "JPEG")
                    archive.writestr(f"2750/{key}", image.getvalue())
                    split[name].append([key, label, folder])
                    index += 1
    (directory / "EuroSAT.zip").write_bytes(buffer.getvalue())
    (directory / "split_zhou_EuroSAT.json").write_text(json.dumps(split, indent=4))
    for agent in ("gpt3", "vicuna"):
        (directory / f"{agent}.json").write_bytes((DATA / f"{agent}-EuroSAT_prompts.json").read_bytes())


@pytest.fixture
def server(tmp_path):
    """(directory, base URL): an http server on 127.0.0.1 serving the EuroSAT files."""
    directory = tmp_path / "served"
    directory.mkdir()
    eurosat_files(directory)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield directory, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(server, tmp_path, monkeypatch):
    """$TRANSAGENT_REGISTRY pointing every EuroSAT download at the server (URLs only, except the archive's md5:
    the descriptions keep their published sha256). gdown must not be reached."""
    directory, url = server
    overrides = {"_about": "a lab mirror", "agents": {"vitdet": {"url": "ignored here"}}, "datasets": {"eurosat": {
        "2750/": {"url": f"{url}/EuroSAT.zip", "md5": md5(directory / "EuroSAT.zip")},
        "split_zhou_EuroSAT.json": {"url": f"{url}/split_zhou_EuroSAT.json"},
        "descriptions/gpt3.json": {"url": f"{url}/gpt3.json"},
        "descriptions/vicuna.json": {"url": f"{url}/vicuna.json"}}}}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(overrides))
    monkeypatch.setenv("TRANSAGENT_REGISTRY", str(path))

    def no_drive(*args, **kwargs):
        raise AssertionError("an overridden URL must not go through gdown")

    import gdown
    monkeypatch.setattr(gdown, "download", no_drive)
    return directory, path


def test_registry_ships_the_official_description_sources():
    official = {name: info for name, info in DATASETS.items() if any(s.description_agent for s in info.sources)}
    assert sorted(official) == sorted(["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                                       "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"])
    for name, info in official.items():
        sources = {s.description_agent: s for s in info.sources if s.description_agent}
        assert sorted(sources) == ["gpt3", "vicuna"]
        for agent, folder in (("gpt3", "template_protext"), ("vicuna", "template")):
            source = sources[agent]
            assert source.path == f"descriptions/{agent}.json" and source.download == "file"
            assert source.url == (f"https://raw.githubusercontent.com/markywg/TransAgent/{COMMIT}/{folder}/"
                                  f"{info.coop_name}_prompts.json")
            assert (source.sha256 is None) == (name == "imagenet"), name   # ImageNet's are pinned at download
    eurosat = {s.description_agent: s.sha256 for s in get_info("eurosat").sources if s.description_agent}
    assert eurosat == {agent: sha256(DATA / f"{agent}-EuroSAT_prompts.json") for agent in ("gpt3", "vicuna")}
    drive = [s for info in DATASETS.values() for s in info.sources if s.url and "drive.google.com" in s.url]
    assert len(drive) == 11 and all(s.download in ("file", "zip") for s in drive)   # 9 splits, classnames, UCF


def test_prepare_fetches_everything_from_a_mirror_and_pins_what_has_no_hash(mirror, tmp_path, caplog):
    served, _ = mirror
    caplog.set_level(logging.INFO, logger="pipelines.datasets")
    ds = prepare("eurosat", tmp_path / "data")
    root = tmp_path / "data" / "eurosat"
    assert ds.num_classes == 10 and len(ds.train) == 20 and ds.classnames[0] == "Annual Crop Land"
    assert (root / "split_zhou_EuroSAT.json").read_bytes() == (served / "split_zhou_EuroSAT.json").read_bytes()
    for agent in ("gpt3", "vicuna"):
        assert (root / "descriptions" / f"{agent}.json").read_bytes() == (served / f"{agent}.json").read_bytes()
    pins = json.loads((root / PINS_FILE).read_text())
    assert pins == {"split_zhou_EuroSAT.json": sha256(served / "split_zhou_EuroSAT.json")}  # the rest is published
    assert not list((root / ".downloads").iterdir())
    lines = caplog.messages
    assert sum("downloading" in line for line in lines) == 4 and any("pinned its sha256" in line for line in lines)
    caplog.clear()
    prepare("eurosat", tmp_path / "data")   # ready: nothing is fetched again
    assert caplog.messages == []

    # a later download is checked against the pin; a changed file is discarded, never put in place
    (root / "split_zhou_EuroSAT.json").unlink()
    (served / "split_zhou_EuroSAT.json").write_text(json.dumps(ds_split_without_last_test(served)))
    with pytest.raises(DatasetError, match=f"pinned for split_zhou_EuroSAT.json at its first download.*{PINS_FILE}"):
        prepare("eurosat", tmp_path / "data")
    assert not (root / "split_zhou_EuroSAT.json").exists() and not list((root / ".downloads").iterdir())


def ds_split_without_last_test(served):
    split = json.loads((served / "split_zhou_EuroSAT.json").read_text())
    return {**split, "test": split["test"][:-1]}


def test_downloads_that_do_not_match_are_refused(mirror, tmp_path):
    served, _ = mirror
    (served / "gpt3.json").write_text(json.dumps({"Forest": ["trees"]}))   # not the published file
    with pytest.raises(DatasetError, match="sha256 .* != the published fe1076499e4f"):
        prepare("eurosat", tmp_path / "a")
    assert not (tmp_path / "a" / "eurosat" / "descriptions" / "gpt3.json").exists()
    # a first download of a file without a published hash is checked for what it must be before it is pinned
    (served / "split_zhou_EuroSAT.json").write_text("<html>Google Drive - quota exceeded</html>")
    with pytest.raises(DatasetError, match="not a valid UTF-8 JSON split file"):
        prepare("eurosat", tmp_path / "b", descriptions=())
    assert not (tmp_path / "b" / "eurosat" / PINS_FILE).exists()
    (served / "EuroSAT.zip").write_bytes(b"PK damaged")
    with pytest.raises(DatasetError, match="md5"):
        prepare("eurosat", tmp_path / "c")


def test_drive_links_go_through_gdown_with_their_id(tmp_path, monkeypatch, server):
    served, _ = server
    assert google_drive_id(f"https://drive.google.com/file/d/{SPLIT_DRIVE_ID}/view?usp=sharing") == SPLIT_DRIVE_ID
    assert google_drive_id("https://drive.google.com/uc?export=download&id=abc-_1") == "abc-_1"
    assert google_drive_id("https://example.org/drive.google.com/file/d/x/view") is None
    assert google_drive_id("https://huggingface.co/datasets/torchgeo/eurosat/resolve/x/EuroSAT.zip") is None
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    calls = []

    def fake_download(*, id, output, quiet):   # gdown's keyword API, as prepare calls it
        calls.append(id)
        Path(output).write_bytes((served / "split_zhou_EuroSAT.json").read_bytes())
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    with zipfile.ZipFile(served / "EuroSAT.zip") as archive:   # images already in place: only the split is fetched
        archive.extractall(tmp_path / "data" / "eurosat")
    ds = prepare("eurosat", tmp_path / "data", descriptions=())
    assert calls == [SPLIT_DRIVE_ID] and ds.num_classes == 10

    def drive_error(**kwargs):
        raise FileURLRetrievalError("Too many users have viewed or downloaded this file recently")

    monkeypatch.setattr(gdown, "download", drive_error)
    (tmp_path / "data" / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetError, match="(?s)Too many users.*split_zhou_EuroSAT.json  *CoOp split"):
        prepare("eurosat", tmp_path / "data", descriptions=())


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid UTF-8 JSON"),
    ({"datasets": {"nope": {}}}, "datasets.nope: unknown dataset"),
    ({"datasets": {"eurosat": {"images/": {"url": "http://x/y.zip"}}}}, r"datasets.eurosat\['images/'\]: eurosat has "
                                                                          "no such source; its sources: 2750/"),
    ({"datasets": {"eurosat": {"2750/": {"md5": "XYZ"}}}}, r"\['2750/'\].md5: expected 32 lower-case hex digits"),
    ({"datasets": {"eurosat": {"2750/": {"url": "ftp://x"}}}}, r"\.url: expected an http\(s\):// or file:// URL"),
    ({"datasets": {"eurosat": {"2750/": {"mirror": "http://x"}}}}, "expected an object with some of"),
    ({"dataset": {}}, "unknown key"),
])
def test_registry_override_file_is_validated(tmp_path, monkeypatch, content, message):
    path = tmp_path / "registry.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setenv("TRANSAGENT_REGISTRY", str(path))
    with pytest.raises(DatasetError, match=f"TRANSAGENT_REGISTRY={path}: .*{message}"):
        prepare("eurosat", tmp_path / "data")


def test_cli_prepare_reports_the_descriptions(mirror, tmp_path):
    result = CliRunner().invoke(datasets_cli, ["prepare", "eurosat", "--data-root", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert "eurosat: ready. 10 classes; train 20 / val 10 / test 10" in result.output
    assert f"vicuna descriptions {tmp_path / 'data' / 'eurosat' / 'descriptions' / 'vicuna.json'}" in result.output


@pytest.fixture
def library_loggers():
    """Leave our loggers and the root logger as they were."""
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in (*LOGGERS, "")}
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


def test_the_cli_shows_library_messages_on_the_first_rank_only(monkeypatch, capsys, library_loggers):
    for rank, shown in (("0", True), ("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        show_library_messages()
        logging.getLogger("pipelines.datasets.preparation").info("eurosat: downloading 2750/")
        logging.getLogger("extract.weights").warning("mae: pinned")
        out, err = capsys.readouterr()
        assert ("eurosat: downloading 2750/" in out) == shown and err.count("mae: pinned") == 1   # one handler


def test_a_library_that_configures_logging_adds_no_second_copy_of_our_lines(capsys, library_loggers):
    show_library_messages()
    logging.warning("No pretrained weights loaded")   # as open_clip does: the root logger gets a default handler
    logging.getLogger("pipelines.extract_run").info("  sd       done")
    out, err = capsys.readouterr()
    assert out.count("sd       done") == 1 and "INFO:" not in out + err
    assert err.count("No pretrained weights loaded") == 1


def test_make_extract_prepares_before_torchrun_starts():
    """With several GPUs the ranks only read: the Makefile prepares the dataset first."""
    repo = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-C", str(repo), "extract", "DATASET=eurosat", "PRESET=tiny", "GPUS=2",
                          "VENV=/nonexistent", "EXTRACT_FLAGS=--batch-size 2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    prepare_line = next(i for i, line in enumerate(dry) if "pipelines datasets prepare eurosat" in line)
    torchrun_line = next(i for i, line in enumerate(dry) if "torchrun" in line)
    assert prepare_line < torchrun_line and "--batch-size 2" in " ".join(dry[torchrun_line:])


@pytest.fixture
def one_thread():
    """As in test_extract_e2e: the tiny models' many small ops run faster on one thread of a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_extract_prepares_eurosat_on_an_empty_data_root_then_extracts(mirror, tmp_path, one_thread):
    """`transagent extract --dataset eurosat` with nothing on disk: images, split and the Vicuna descriptions
    arrive, then dino reads the images and vicuna encodes the descriptions. (Two descriptions per class here, with
    their sha256 in the override file, to keep the tiny text encoder quick.)"""
    from cache_schema import CacheReader, verify
    from pipelines.cli import main

    served, registry = mirror
    overrides = json.loads(registry.read_text())
    for agent in ("gpt3", "vicuna"):
        short = {name: texts[:2] for name, texts in json.loads((served / f"{agent}.json").read_text()).items()}
        (served / f"{agent}.json").write_text(json.dumps(short))
        overrides["datasets"]["eurosat"][f"descriptions/{agent}.json"]["sha256"] = sha256(served / f"{agent}.json")
    registry.write_text(json.dumps(overrides))
    data, cache = tmp_path / "data", tmp_path / "cache"
    args = ["extract", "--dataset", "eurosat", "--preset", "tiny", "--agents", "vicuna,dino", "--shots", "1",
            "--views", "1", "--batch-size", "5", "--data-root", str(data), "--cache-root", str(cache)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "eurosat: downloading 2750/" in result.output and "eurosat: downloading descriptions/vicuna.json" in \
        result.output
    manifests = {path.parent.parent.name: json.loads(path.read_text())
                 for path in cache.glob("eurosat/*/*/manifest.json")}
    assert sorted(manifests) == ["dino", "vicuna"]
    assert all(m["status"] == "complete" for m in manifests.values())
    vicuna = next(cache.glob("eurosat/vicuna/*"))
    assert verify(vicuna) == [] and len(CacheReader(vicuna).rows) == 10
    assert json.loads((vicuna / "files" / "descriptions.json").read_text()) == json.loads(
        (served / "vicuna.json").read_text())
    assert manifests["vicuna"]["fields"]["family"]["options"]["descriptions_sha256"] == sha256(served / "vicuna.json")
    assert not (data / "eurosat" / "descriptions" / "gpt3.json").exists()   # only what the chosen agents read
    assert manifests["dino"]["rows"] == 5   # one shot of each of the 5 base classes, from the downloaded archive
    result = CliRunner().invoke(main, args)   # complete: nothing is fetched or computed again
    assert result.exit_code == 0 and "downloading" not in result.output and "2 already complete" in result.output
