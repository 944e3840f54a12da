"""Datasets layer: split files, verification, conversions, few-shot files, base/novel, synthetic, folder, CLI."""
import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipelines.commands.datasets import datasets as datasets_cli
from pipelines.datasets import (DATASETS, DatasetError, Sample, draw_fewshot, fewshot_keys, fewshot_selection,
                                get_info, load_dataset, make_synthetic, prepare, subsample_classes)
from pipelines.datasets.synthetic import class_names, encode_png, render, synthetic_split

EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fake_eurosat(data_root, per_split=(3, 2, 2), classes=EUROSAT_FOLDERS, indent=4):
    """A CoOp-style EuroSAT: 2750/<Class>/<Class>_<i>.jpg + split_zhou_EuroSAT.json written like Dassl's write_json."""
    root = data_root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, folder in enumerate(classes):
        index = 0
        for name, count in zip(split, per_split, strict=True):
            for _ in range(count):
                key = f"{folder}/{folder}_{index}.jpg"
                touch(root / "2750" / key)
                split[name].append([key, label, folder])
                index += 1
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split, indent=indent, separators=(",", ": ")))
    return root


# --- split files and verification -------------------------------------------------------------------------

def test_coop_split_is_read_with_fixed_class_names_and_exact_keys(tmp_path):
    root = fake_eurosat(tmp_path)
    ds = load_dataset("eurosat", tmp_path)
    assert ds.classnames[0] == "Annual Crop Land" and ds.classnames[3] == "Highway or Road"
    assert ds.classnames[9] == "Sea or Lake" and ds.num_classes == 10
    assert ds.template == "a centered satellite photo of {}."
    assert ds.transagent_template == "a centered satellite photo of a {}."
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 20, 20)
    assert ds.train[0] == Sample("AnnualCrop/AnnualCrop_0.jpg", 0, "Annual Crop Land")
    assert ds.image_root == root / "2750" and ds.image_path(ds.train[0].key).is_file()
    assert ds.split_hash == hashlib.sha256((root / "split_zhou_EuroSAT.json").read_bytes()).hexdigest()
    assert get_info("EuroSAT") is DATASETS["eurosat"]


@pytest.mark.parametrize("entry, message", [
    (["/abs/a.jpg", 0, "A"], "relative POSIX path"),
    (["A\\a.jpg", 0, "A"], "relative POSIX path"),
    (["A/../a.jpg", 0, "A"], "relative POSIX path"),
    (["A/a.jpg", "0", "A"], "integer label"),
    (["A/a.jpg", 0], "expected [relpath"),
])
def test_malformed_split_entries_are_rejected(tmp_path, entry, message):
    root = fake_eurosat(tmp_path)
    split = json.loads((root / "split_zhou_EuroSAT.json").read_text())
    split["test"].append(entry)
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=message.replace("[", r"\[")):
        load_dataset("eurosat", tmp_path)


def test_missing_images_are_listed_with_their_count(tmp_path):
    root = fake_eurosat(tmp_path)
    gone = ["Forest/Forest_1.jpg", "River/River_4.jpg", "SeaLake/SeaLake_6.jpg"]
    for key in gone:
        (root / "2750" / key).unlink()
    with pytest.raises(DatasetError) as error:
        load_dataset("eurosat", tmp_path)
    text = str(error.value)
    assert "3 of 70 images" in text and all(key in text for key in gone)
    assert "drive.google.com" in text   # tells where the data comes from
    assert len(load_dataset("eurosat", tmp_path, verify=False).test) == 20


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'eurosatt'.*eurosat.*imagenet_r.*synthetic"):
        load_dataset("eurosatt", tmp_path)


def test_missing_split_tells_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json.*datasets prepare dtd"):
        load_dataset("dtd", tmp_path)


def test_class_count_mismatch(tmp_path):
    fake_eurosat(tmp_path, classes=EUROSAT_FOLDERS[:9])
    with pytest.raises(DatasetError, match="9 classes, but eurosat has 10"):
        load_dataset("eurosat", tmp_path)


def test_label_with_two_class_names(tmp_path):
    root = fake_eurosat(tmp_path)
    split = json.loads((root / "split_zhou_EuroSAT.json").read_text())
    split["test"][0][2] = "Forest"    # label 0 named AnnualCrop elsewhere
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match="label 0 is 'Annual Crop Land' at train.0. but 'Forest' at test.0."):
        load_dataset("eurosat", tmp_path)


def test_label_gap(tmp_path):
    root = fake_eurosat(tmp_path)
    split = json.loads((root / "split_zhou_EuroSAT.json").read_text())
    for name in split:
        split[name] = [[k, 10 if label == 9 else label, c] for k, label, c in split[name]]
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=r"label\(s\) \[9\] never occur"):
        load_dataset("eurosat", tmp_path)


# --- conversions ------------------------------------------------------------------------------------------

IMAGENET_NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write_classnames(path, names=IMAGENET_NAMES):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in names.items()))


def fake_imagenet(data_root):
    root = data_root / "imagenet"
    write_classnames(root / "classnames.txt")
    for wnid in IMAGENET_NAMES:
        for i in range(3):
            touch(root / "images" / "train" / wnid / f"{wnid}_{i}.JPEG")
        touch(root / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG")
    touch(root / "images" / "train" / "n01440764" / ".DS_Store")
    return root


def test_imagenet_conversion(tmp_path):
    root = fake_imagenet(tmp_path)
    with pytest.raises(DatasetError, match="3 classes, but imagenet has 1000"):
        prepare("imagenet", tmp_path, download=False)   # the real entry converts, then refuses the class count
    ds = prepare(dataclasses.replace(get_info("imagenet"), num_classes=3), tmp_path, download=False)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert ds.train[:3] == [Sample(f"train/n01440764/n01440764_{i}.JPEG", 0, "tench") for i in range(3)]
    assert len(ds.train) == 9 and ds.val == [] and len(ds.test) == 3
    assert ds.test[2] == Sample("val/n01484850/ILSVRC2012_val_n01484850.JPEG", 2, "great white shark")
    assert ds.split_path == root / "split_ImageNet.json"


def test_imagenet_conversion_needs_class_folders_in_val(tmp_path):
    root = fake_imagenet(tmp_path)
    for wnid in IMAGENET_NAMES:
        val = root / "images" / "val"
        (val / wnid / f"ILSVRC2012_val_{wnid}.JPEG").rename(val / f"{wnid}.JPEG")
        (val / wnid).rmdir()
    with pytest.raises(DatasetError, match="no <wnid>/ folders"):
        prepare("imagenet", tmp_path, download=False)


def test_imagenet_conversion_reports_missing_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)missing:\n.*images/train.*image-net.org"):
        prepare("imagenet", tmp_path, download=False)


def test_fgvc_aircraft_conversion(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18"]
    root.mkdir()
    (root / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, ids in {"train": ["1025794", "1340192"], "val": ["0056978"], "test": ["2233344", "0123456"]}.items():
        lines = [f"{image_id} {variants[i % 3] if split != 'train' else variants[i]}" for i, image_id in enumerate(ids)]
        if split == "train":
            lines.append("0999999 F/A-18")
            ids = ids + ["0999999"]
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for image_id in ids:
            touch(root / "images" / f"{image_id}.jpg")
    ds = prepare(dataclasses.replace(get_info("fgvc_aircraft"), num_classes=3), tmp_path, download=False)
    assert ds.classnames == variants
    assert ds.train == [Sample("1025794.jpg", 0, "707-320"), Sample("1340192.jpg", 1, "A300B4"),
                        Sample("0999999.jpg", 2, "F/A-18")]
    assert ds.val == [Sample("0056978.jpg", 0, "707-320")] and len(ds.test) == 2

    (root / "split_FGVCAircraft.json").unlink()
    (root / "images_variant_val.txt").write_text("0056978 Boeing 999\n")
    with pytest.raises(DatasetError, match="images_variant_val.txt:1: variant 'Boeing 999' is not in variants.txt"):
        prepare("fgvc_aircraft", tmp_path, download=False)


def test_imagenet_variant_conversions(tmp_path):
    write_classnames(tmp_path / "imagenet" / "classnames.txt")   # copied into each variant by prepare
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(3):
        touch(v2 / str(label) / "a.jpeg")
        touch(v2 / str(label) / "b.jpeg")
    ds = prepare(dataclasses.replace(get_info("imagenet_v2"), num_classes=3), tmp_path, download=False)
    assert ds.train == [] and ds.val == [] and len(ds.test) == 6
    assert ds.test[-1] == Sample("2/b.jpeg", 2, "great white shark")

    adversarial = tmp_path / "imagenet-adversarial" / "imagenet-a"
    for wnid in ["n01484850", "n01443537"]:   # a subset of the classes, as in ImageNet-A
        touch(adversarial / wnid / "0.jpg")
    touch(adversarial / "README.txt")
    ds = prepare(dataclasses.replace(get_info("imagenet_a"), num_classes=2), tmp_path, download=False)
    assert ds.classnames == ["goldfish", "great white shark"]   # sorted folders -> labels, as CoOp
    assert ds.test == [Sample("n01443537/0.jpg", 0, "goldfish"), Sample("n01484850/0.jpg", 1, "great white shark")]

    with pytest.raises(DatasetError, match="has no training split"):
        fewshot_selection(ds, 1, 1)


# --- few-shot selections and base/novel ----------------------------------------------------------------

def test_fewshot_file_is_identical_across_runs_and_data_roots(tmp_path):
    paths = []
    for root in (tmp_path / "a", tmp_path / "b" / "nested"):
        make_synthetic(root, num_classes=4, per_class=(6, 3, 2))
        ds = load_dataset("synthetic", root)
        keys = fewshot_keys("synthetic", 4, 2, data_root=root)
        paths.append(ds.root / "fewshot" / "shot_4-seed_2.json")
        assert keys == json.loads(paths[-1].read_text())["train"]
    first = paths[0].read_bytes()
    assert first == paths[1].read_bytes()
    assert str(tmp_path).encode() not in first
    paths[0].unlink()
    fewshot_keys("synthetic", 4, 2, data_root=tmp_path / "a")       # second draw, same bytes
    assert paths[0].read_bytes() == first
    record = json.loads(first)
    assert set(record) == {"shots", "seed", "split_hash", "train", "val"}
    assert (record["shots"], record["seed"]) == (4, 2) and len(record["train"]) == 16
    assert len(record["val"]) == 12   # min(K, 4) = 4 val shots, but each class has only 3: Dassl keeps them all
    assert fewshot_keys("synthetic", 4, 3, data_root=tmp_path / "a") != record["train"]


def test_fewshot_draw_follows_dassl(tmp_path):
    make_synthetic(tmp_path, num_classes=3, per_class=(6, 5, 1))
    ds = load_dataset("synthetic", tmp_path)
    train, val = draw_fewshot(ds, 5, 7)
    rng = random.Random(7)     # Dassl: random.seed(SEED), then random.sample per class, train then val
    expected_train = [s.key for label in range(3) for s in rng.sample([s for s in ds.train if s.label == label], 5)]
    expected_val = [s.key for label in range(3) for s in rng.sample([s for s in ds.val if s.label == label], 4)]
    assert (train, val) == (expected_train, expected_val)
    assert [s.label for s in ds.select(train)] == [0] * 5 + [1] * 5 + [2] * 5


def test_existing_fewshot_file_is_read_back_not_redrawn(tmp_path):
    make_synthetic(tmp_path, num_classes=2, per_class=(4, 2, 1))
    ds = load_dataset("synthetic", tmp_path)
    selection = fewshot_selection(ds, 1, 1)
    record = json.loads(selection.path.read_text())
    record["train"] = ["red_circle/0003.png", "green_square/0003.png"]   # valid keys, not what the RNG picks
    selection.path.write_text(json.dumps(record))
    assert fewshot_selection(ds, 1, 1).train == record["train"]
    record["split_hash"] = "0" * 64
    selection.path.write_text(json.dumps(record))
    with pytest.raises(DatasetError, match="drawn from split file sha256 000000000000.*split changed"):
        fewshot_selection(ds, 1, 1)


def test_too_many_shots_names_the_classes(tmp_path):
    make_synthetic(tmp_path, num_classes=3, per_class=(4, 1, 1))
    ds = load_dataset("synthetic", tmp_path)
    with pytest.raises(DatasetError, match="5 shots requested but 3 class.*'red circle' has 4"):
        fewshot_selection(ds, 5, 1)
    assert not (ds.root / "fewshot").exists()


def test_base_novel_relabelling():
    names = ["a", "b", "c", "d", "e"]
    samples = [Sample(f"{n}/{i}.png", label, n) for label, n in enumerate(names) for i in range(2)]
    base, base_names = subsample_classes(samples, names, "base")
    assert base_names == ["a", "b", "c"] and {s.label for s in base} == {0, 1, 2} and len(base) == 6
    novel, novel_names = subsample_classes(samples, names, "novel")
    assert novel_names == ["d", "e"]
    assert novel == [Sample("d/0.png", 0, "d"), Sample("d/1.png", 0, "d"), Sample("e/0.png", 1, "e"),
                     Sample("e/1.png", 1, "e")]
    assert subsample_classes(samples, names, "all") == (samples, names)
    with pytest.raises(ValueError, match="unknown class set 'new'"):
        subsample_classes(samples, names, "new")


# --- synthetic and folder datasets ------------------------------------------------------------------------

def test_synthetic_is_byte_identical_and_idempotent(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    make_synthetic(first, num_classes=3, per_class=(2, 1, 1))
    make_synthetic(second, num_classes=3, per_class=(2, 1, 1))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 14   # 12 PNGs + split file + descriptions/gpt3.json
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    png = first / "synthetic" / "images" / "blue_horizontal_stripes" / "0003.png"
    stamp = png.stat().st_mtime_ns
    make_synthetic(first, num_classes=3, per_class=(2, 1, 1))
    assert png.stat().st_mtime_ns == stamp     # present and valid: nothing rewritten
    png.unlink()
    make_synthetic(first, num_classes=3, per_class=(2, 1, 1))
    assert png.read_bytes() == (second / png.relative_to(first)).read_bytes()
    with Image.open(png) as image:
        assert image.size == (48, 40) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), render(2, 3))
    ds = load_dataset("synthetic", first)
    assert ds.classnames == ["red circle", "green square", "blue horizontal stripes"]
    assert ds.split_path.name == "split_zhou_Synthetic.json" and len(ds.train) == 6
    make_synthetic(first, num_classes=2, per_class=(3, 1, 1))     # other knobs: regenerated, not mixed
    ds = load_dataset("synthetic", first)
    assert ds.num_classes == 2 and len(ds.train) == 6 and ds.train[2].key == "red_circle/0002.png"


def test_synthetic_classes_are_separable_by_colour():
    """Nearest class-mean of the foreground colour classifies every test image: learnable from colour."""
    split = synthetic_split()

    def foreground_colour(key, label):
        pixels = render(label, int(key[-8:-4])).reshape(-1, 3).astype(int)
        salient = (pixels.max(1) - pixels.min(1) > 60) | (pixels.min(1) > 150)
        return pixels[salient].mean(0)

    train = np.array([foreground_colour(k, label) for k, label, _ in split["train"]])
    train_labels = np.array([label for _, label, _ in split["train"]])
    means = np.stack([train[train_labels == c].mean(0) for c in range(10)])
    test = np.array([foreground_colour(k, label) for k, label, _ in split["test"]])
    predicted = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == np.array([label for _, label, _ in split["test"]])).all()
    assert len(set(class_names(100))) == 100


def test_png_encoder_round_trips():
    image = np.random.default_rng(0).integers(0, 256, size=(300, 250, 3), dtype=np.uint8)  # > one deflate block
    with Image.open(io.BytesIO(encode_png(image))) as decoded:
        assert np.array_equal(np.asarray(decoded), image)


def test_folder_dataset_split_is_drawn_once_and_deterministic(tmp_path):
    for data_root in (tmp_path / "x", tmp_path / "y"):
        for name, count in {"cat": 10, "dog_breed": 7}.items():
            for i in range(count):
                touch(data_root / "lab" / name / f"{i:02d}.jpg")
        touch(data_root / "lab" / "dog_breed" / "notes.txt")
    ds = load_dataset("folder:lab", tmp_path / "x")
    assert ds.classnames == ["cat", "dog breed"] and ds.slug == "folder-lab"
    assert [len(ds.train), len(ds.val), len(ds.test)] == [5 + 4, 2 + 1, 3 + 2]
    assert ds.split_path.read_bytes() == (load_dataset("folder:lab", tmp_path / "y").split_path).read_bytes()
    fewshot_selection(ds, 2, 1)                          # fewshot/ inside the folder is not a class
    assert load_dataset("folder:lab", tmp_path / "x").split_hash == ds.split_hash
    touch(tmp_path / "x" / "lab" / "cat" / "new.jpg")   # the split is written once, not re-drawn
    assert load_dataset("folder:lab", tmp_path / "x").split_hash == ds.split_hash
    touch(tmp_path / "z" / "lab" / "fish" / "0.jpg")
    with pytest.raises(DatasetError, match="1 images; a 50/20/30 split needs at least 4"):
        load_dataset("folder:lab", tmp_path / "z")


# --- CLI --------------------------------------------------------------------------------------------------

def test_cli(tmp_path):
    runner = CliRunner()
    result = runner.invoke(datasets_cli, ["fewshot", "synthetic", "--shots", "2", "--seeds", "1,2",
                                          "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "shot_2-seed_1.json: 20 train / 20 val keys (written)" in result.output
    assert "shot_2-seed_2.json" in result.output
    result = runner.invoke(datasets_cli, ["fewshot", "synthetic", "--shots", "2", "--seeds", "1",
                                          "--data-root", str(tmp_path)])
    assert "(reused)" in result.output

    result = runner.invoke(datasets_cli, ["ls", "--data-root", str(tmp_path)])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line}
    assert "a centered satellite photo of {}." in lines["eurosat"] and " no " in lines["eurosat"]
    assert lines["synthetic"].split()[1:3] == ["yes", "yes"]
    assert "200 test-only" in lines["imagenet_a"]

    result = runner.invoke(datasets_cli, ["prepare", "synthetic", "--data-root", str(tmp_path)])
    assert result.exit_code == 0 and "synthetic: ready. 10 classes; train 240 / val 80 / test 120" in result.output

    result = runner.invoke(datasets_cli, ["prepare", "eurosat", "--no-download", "--data-root", str(tmp_path)])
    assert result.exit_code == 1
    assert "split_zhou_EuroSAT.json" in result.output and "huggingface.co" in result.output

    result = runner.invoke(datasets_cli, ["fewshot", "nope", "--data-root", str(tmp_path)])
    assert result.exit_code == 1 and "unknown dataset 'nope'" in result.output


def test_cli_module_imports_no_torch():
    code = "import sys, pipelines.commands.datasets, pipelines.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
