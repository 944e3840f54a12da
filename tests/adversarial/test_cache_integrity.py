"""Attacks on the cache's integrity: journals that lie, corruption an incremental run would launder, manifests and
row tables a reader would trust, hostile packs, and malformed files that must get a sentence, not a traceback.

Run alone: `pytest tests/adversarial/test_cache_integrity.py -v` (the test names say what each one attacks).
"""
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema import (AgentCache, ArraySpec, CacheError, CacheReader, CorruptCacheError,
                          SchemaVersionError, select_cache, verify)
from cache_schema.fingerprint import fingerprint
from cache_schema.install import install_pack
from cache_schema.merge import merge
from cache_schema.pack import pack_cache
from pipelines.cli import main as cli
from pipelines.share import RemoteError, pull, push

ARRAYS = {"tokens": ArraySpec((2, 3, 4), "float16"), "token_mean": ArraySpec((2, 4), "float32"),
          "views": ArraySpec((5,), "int32")}
FIELDS = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}
BACKENDS = ["zarr", "hdf5"]


def rows_of(keys, views=2):
    return [(f"class_{k % 3}/img_{k}.png", v) for k in keys for v in range(views)]


def row_values(row):
    """Content derived from the row itself, so a row attached to another key is visible."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{row[0]}|{row[1]}".encode()).digest()[:8], "little"))
    return {"tokens": rng.standard_normal((2, 3, 4)).astype(np.float16),
            "token_mean": rng.standard_normal((2, 4)).astype(np.float32),
            "views": np.array([row[1], 0, 0, 8, 8], dtype=np.int32)}


def open_cache(root, backend="zarr"):
    return AgentCache.open(root, "toyset", "toy", FIELDS, ARRAYS, backend=backend)


def write_rows(cache, wanted, limit=None):
    """Plan `wanted`, create the segments and write (at most `limit`) rows one by one."""
    plan = cache.plan(wanted)
    cache.create_segments()
    written = 0
    for name, local_rows in plan[0]:
        with cache.segment_writer(name) as writer:
            for local in local_rows:
                if limit is not None and written >= limit:
                    return
                values = row_values(writer.rows[local])
                writer.write([local], {k: v[None] for k, v in values.items()})
                written += 1


def write_cache(root, rows, backend="zarr", files=None):
    cache = open_cache(root, backend)
    write_rows(cache, rows)
    for name, data in (files or {}).items():
        cache.add_file(name, data)
    cache.finalize()
    return cache.path


def manifest_of(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def save_manifest(path, manifest):
    (Path(path) / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def journal(path, segment="seg-00000"):
    return Path(path) / "segments" / f"{segment}.done.jsonl"


def flip_byte(file: Path, position: int) -> None:
    data = bytearray(file.read_bytes())
    data[position] ^= 0x10
    file.write_bytes(bytes(data))


def hdf5_row_position(path, array="tokens", row=0):
    """A byte inside row `row` of an hdf5 segment's dataset."""
    import h5py

    with h5py.File(path / "segments" / "seg-00000.h5", "r") as handle:
        return handle[array].id.get_offset() + row * ARRAYS[array].row_bytes + 3


def content(path):
    """{file: bytes} of a cache directory, without the writer lock a merge may leave behind."""
    return {p: p.read_bytes() for p in Path(path).rglob("*") if p.is_file() and ".writer" not in p.parts}


def every_file(path):
    return {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()}


def rewrite_pack(pack: Path, out: Path, edit=lambda name, data: data, extra=(), replace=None) -> Path:
    """A copy of a pack with members' bytes edited, members replaced by (TarInfo, bytes), and members added."""
    with tarfile.open(pack) as source, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as target:
        for member in source.getmembers():
            if replace and member.name in replace:
                info, data = replace[member.name]
                target.addfile(info, io.BytesIO(data))
                continue
            data = source.extractfile(member).read() if member.isfile() else None
            if data is not None:
                data = edit(member.name, data)
                member.size = len(data)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
        for info, data in extra:
            target.addfile(info, io.BytesIO(data))
    return out


def file_member(name, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def visible(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                  if ".incoming" not in p.relative_to(root).parts) if Path(root).exists() else []


# ------------------------------------------------------------------------------------ journals are validated (3)
def test_out_of_range_journal_rows_do_not_make_an_hdf5_segment_look_finished(tmp_path):
    cache = open_cache(tmp_path, "hdf5")
    write_rows(cache, rows_of(range(2)), limit=2)              # 2 of 4 rows written
    entry = json.loads(journal(cache.path).read_text().splitlines()[0])
    with open(journal(cache.path), "a") as handle:           # two foreign rows: 4 lines for 4 planned rows
        for row in (7, 9):
            handle.write(json.dumps({**entry, "row": row}) + "\n")
    with pytest.raises(CorruptCacheError, match=r"seg-00000\.done\.jsonl:3: row 7 is not one of"):
        cache.finalize()
    assert manifest_of(cache.path)["status"] == "partial"
    with pytest.raises(CorruptCacheError, match=r"done\.jsonl:3"):
        open_cache(tmp_path, "hdf5").plan(rows_of(range(2)))


def test_duplicate_journal_row_is_an_error_naming_file_and_line(tmp_path):
    cache = open_cache(tmp_path)
    write_rows(cache, rows_of(range(2)), limit=2)
    lines = journal(cache.path).read_text().splitlines()
    journal(cache.path).write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(CorruptCacheError, match=r"done\.jsonl:3: row 1 is journaled twice"):
        open_cache(tmp_path).plan(rows_of(range(2)))


def test_malformed_journal_line_before_the_last_is_an_error(tmp_path):
    cache = open_cache(tmp_path)
    write_rows(cache, rows_of(range(2)), limit=2)
    lines = journal(cache.path).read_text().splitlines()
    journal(cache.path).write_text("\n".join([lines[0], '{"row": 1, "sha2', lines[1]]) + "\n")
    with pytest.raises(CorruptCacheError, match=r"done\.jsonl:2: not a journal entry"):
        open_cache(tmp_path).plan(rows_of(range(2)))


def test_journal_line_without_row_gets_a_sentence(tmp_path):
    cache = open_cache(tmp_path)
    write_rows(cache, rows_of(range(2)), limit=2)
    with open(journal(cache.path), "a") as handle:
        handle.write(json.dumps({"files": {}}) + "\n")
    with pytest.raises(CorruptCacheError, match=r"done\.jsonl:3: journal entry without 'row'"):
        open_cache(tmp_path).plan(rows_of(range(2)))
    result = CliRunner().invoke(cli, ["cache", "ls", "--cache-root", str(tmp_path)])
    assert result.exit_code == 0 and "damaged" in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_torn_last_journal_line_is_repaired_on_resume(tmp_path, backend):
    rows = rows_of(range(3))
    cache = open_cache(tmp_path / "torn", backend)
    write_rows(cache, rows, limit=3)
    with open(journal(cache.path), "a") as handle:           # a kill (or a full disk) in the middle of a line
        handle.write('{"row": 3, "sha256": {"tok')
    assert open_cache(tmp_path / "torn", backend).done_rows() == set(sorted(rows)[:3])
    resumed = write_cache(tmp_path / "torn", rows, backend)   # the first resume finishes the cache
    clean = write_cache(tmp_path / "clean", rows, backend)
    assert verify(resumed) == []
    assert [json.loads(line)["row"] for line in journal(resumed).read_text().splitlines()[:6]] == list(range(6))
    a, b = CacheReader(resumed), CacheReader(clean)
    for name in ARRAYS:
        np.testing.assert_array_equal(a.read(name, rows), b.read(name, rows))


# ------------------------------------------------------------------------------ no laundering of corruption (4)
@pytest.mark.parametrize("backend", BACKENDS)
def test_journal_lines_carry_the_sha256_of_each_rows_bytes(tmp_path, backend):
    path = write_cache(tmp_path, rows_of(range(2)), backend)
    rows = json.loads((path / "segments" / "seg-00000.rows.json").read_text())
    entries = [json.loads(line) for line in journal(path).read_text().splitlines()]
    rows_entries = [e for e in entries if "row" in e]
    assert len(rows_entries) == len(rows)
    for entry in rows_entries:
        expected = row_values(tuple(rows[entry["row"]]))
        assert entry["sha256"] == {name: hashlib.sha256(np.ascontiguousarray(value, ARRAYS[name].numpy_dtype)
                                                        .tobytes()).hexdigest() for name, value in expected.items()}


def test_incremental_extraction_refuses_a_flipped_byte_in_an_hdf5_segment(tmp_path):
    path = write_cache(tmp_path, rows_of(range(2)), "hdf5")
    flip_byte(path / "segments" / "seg-00000.h5", hdf5_row_position(path))
    with pytest.raises(CorruptCacheError, match=r"segments/seg-00000\.h5 differs from its recorded checksum"):
        write_cache(tmp_path, rows_of(range(4)), "hdf5")
    assert not (path / "segments" / "seg-00001.rows.json").exists()
    assert any("checksum mismatch in segments/seg-00000.h5" in problem for problem in verify(path))


def test_incremental_extraction_refuses_a_swapped_segment_row_table(tmp_path):
    path = write_cache(tmp_path, rows_of(range(2)))
    table = path / "segments" / "seg-00000.rows.json"
    rows = json.loads(table.read_text())
    rows[0], rows[1] = rows[1], rows[0]
    table.write_text(json.dumps(rows, indent=1) + "\n")
    with pytest.raises(CorruptCacheError, match=r"seg-00000\.rows\.json differs from its recorded checksum"):
        write_cache(tmp_path, rows_of(range(4)))
    assert "checksum mismatch in segments/seg-00000.rows.json" in " ".join(verify(path))


def test_hdf5_segment_is_hashed_at_its_seal_and_never_rehashed_by_finalize(tmp_path):
    cache = open_cache(tmp_path, "hdf5")
    write_rows(cache, rows_of(range(2)))                      # the writer seals the finished segment on close
    seal = json.loads(journal(cache.path).read_text().splitlines()[-1])["sealed"]
    segment = cache.path / "segments" / "seg-00000.h5"
    assert seal["sha256"] == hashlib.sha256(segment.read_bytes()).hexdigest()
    flip_byte(segment, hdf5_row_position(cache.path, "token_mean", 1))   # altered after its seal
    manifest = cache.finalize()
    assert manifest["checksums"]["segments/seg-00000.h5"] == seal["sha256"]
    assert "checksum mismatch in segments/seg-00000.h5" in " ".join(verify(cache.path))


def test_hdf5_row_altered_between_write_and_seal_is_caught(tmp_path):
    cache = open_cache(tmp_path, "hdf5")
    plan = cache.plan(rows_of(range(1)))
    cache.create_segments()
    [(name, local_rows)] = plan[0]
    with pytest.raises(CorruptCacheError, match="row 0 of array 'tokens' is not the bytes that were written"):
        with cache.segment_writer(name) as writer:
            for local in local_rows:
                writer.write([local], {k: v[None] for k, v in row_values(writer.rows[local]).items()})
            flip_byte(cache.path / "segments" / "seg-00000.h5", hdf5_row_position(cache.path, "tokens", 0))
    with pytest.raises(CorruptCacheError, match="not the bytes that were written"):
        cache.finalize()


# ---------------------------------------------------------------------------- stage 2 checks what it reads (5)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_row_table_entries_are_refused_on_open(tmp_path, backend):
    path = write_cache(tmp_path, rows_of(range(2)), backend)
    rows = json.loads((path / "rows.json").read_text())
    rows[0], rows[2] = rows[2], rows[0]
    (path / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    with pytest.raises(CorruptCacheError, match=r"rows\.json does not match its checksum"):
        CacheReader(path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["dtype", "row_shape"])
def test_edited_array_spec_in_the_manifest_is_refused_on_open(tmp_path, backend, edit):
    path = write_cache(tmp_path, rows_of(range(2)), backend)
    manifest = manifest_of(path)   # same bytes per row either way, so sizes alone cannot tell
    manifest["arrays"]["token_mean"] = ({"dtype": "int32", "row_shape": [2, 4]} if edit == "dtype" else
                                        {"dtype": "float32", "row_shape": [4, 2]})
    save_manifest(path, manifest)
    with pytest.raises(CorruptCacheError, match="token_mean.*the manifest says"):
        CacheReader(path)
    assert any("the manifest says" in problem for problem in verify(path))


@pytest.mark.parametrize("name", ["../seg-00000", "seg-00000/../../x", "seg-00000/evil"])
def test_segment_name_with_separators_or_dotdot_is_refused(tmp_path, name):
    path = write_cache(tmp_path, rows_of(range(2)))
    manifest = manifest_of(path)
    manifest["segments"][0]["name"] = name
    save_manifest(path, manifest)
    with pytest.raises(CorruptCacheError, match=r"segments\[0\]"):
        CacheReader(path)
    assert "segments[0]" in " ".join(verify(path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_finalize_lists_every_file_but_manifest_leases_lock_and_temporaries(tmp_path, backend):
    cache = open_cache(tmp_path, backend)
    write_rows(cache, rows_of(range(2)))
    cache.add_file("descriptions.json", b"{}")
    outside = [".readers/123@host-abcd", ".writer/lock", ".writer/lease.json", ".lock", "writer.lock",
               "segments/stray.tmp"]
    for relative in outside:
        (cache.path / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache.path / relative).write_text("x")
    listed = set(cache.finalize()["checksums"])
    assert listed == every_file(cache.path) - {"manifest.json", *outside}
    assert "segments/seg-00000.done.jsonl" in listed
    if backend == "zarr":
        assert {"segments/seg-00000.zarr/zarr.json", "segments/seg-00000.zarr/tokens/zarr.json"} <= listed
    assert verify(cache.path) == []


def test_verify_reports_files_present_but_unlisted_and_listed_but_absent(tmp_path):
    path = write_cache(tmp_path, rows_of(range(2)), files={"a.json": b"1"})
    (path / "segments" / "extra.bin").write_bytes(b"not part of the cache")
    (path / "files" / "a.json").unlink()
    problems = verify(path)
    assert any("segments/extra.bin is present but not listed" in p for p in problems)
    assert any("missing file files/a.json" in p for p in problems)
    result = CliRunner().invoke(cli, ["cache", "verify", str(path)])
    assert result.exit_code == 1 and "extra.bin is present but not listed" in result.output


def test_verify_finds_a_chunk_dropped_from_both_the_manifest_and_the_disk(tmp_path):
    path = write_cache(tmp_path, rows_of(range(2)))
    chunk = "segments/seg-00000.zarr/tokens/c/1/0/0/0"
    manifest = manifest_of(path)
    del manifest["checksums"][chunk]
    save_manifest(path, manifest)
    (path / chunk).unlink()
    assert verify(path) == [f"{path}: missing file {chunk} (and not listed in the manifest's checksums)"]


def as_schema_1(path: Path) -> Path:
    """The same cache as the previous schema wrote it: old journal lines, journals and the zarr group metadata
    unlisted, schema_version 1 (and so another fingerprint and directory)."""
    manifest = manifest_of(path)
    manifest["schema_version"] = manifest["fields"]["schema_version"] = 1
    for segment in manifest["segments"]:
        name = segment["name"]
        lines = []
        for line in journal(path, name).read_text().splitlines():
            entry = json.loads(line)
            if "row" not in entry:
                continue   # schema 1 had no seal
            files = {} if manifest["backend"] == "hdf5" else {
                f"segments/{name}.zarr/{array}/c/{entry['row']}/" + "/".join("0" * len(ARRAYS[array].row_shape)):
                digest for array, digest in entry["sha256"].items()}
            lines.append(json.dumps({"row": entry["row"], "files": files}))
        journal(path, name).write_text("\n".join(lines) + "\n")
        manifest["checksums"].pop(f"segments/{name}.done.jsonl")
        manifest["checksums"].pop(f"segments/{name}.zarr/zarr.json", None)
    manifest["fingerprint"] = fingerprint(manifest["fields"])
    save_manifest(path, manifest)
    return path.rename(path.parent / manifest["fingerprint"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_1_cache_keeps_its_old_listing_as_allowance(tmp_path, backend):
    rows = rows_of(range(2))
    old = as_schema_1(write_cache(tmp_path / "c", rows, backend))
    assert verify(old) == []
    np.testing.assert_array_equal(CacheReader(old).read("tokens", rows)[3], row_values(rows[3])["tokens"])
    assert select_cache(tmp_path / "c", "toyset", "toy", {"dataset": {"split_hash": "abc"}}) == old
    pack = pack_cache(old, tmp_path / "old.tar")
    assert pack.schema_version == 1
    installed = install_pack(tmp_path / "old.tar", tmp_path / "bob")
    assert installed.status == "installed" and verify(installed.path) == []
    (old / "segments" / "seg-00000.extra").write_text("x")      # the allowance is those files only
    assert verify(old) == [f"{old}: file segments/seg-00000.extra is present but not listed in the manifest's "
                           "checksums"]


# --------------------------------------------------------------------------------------------- packs (6)
def test_pack_with_a_sparse_member_is_refused(tmp_path):
    blob = b"x" * 10 + bytes((1 << 20) - 10)   # listed with its real checksum: today it unpacks and verifies
    path = write_cache(tmp_path / "c", rows_of(range(1)), files={"blob.bin": blob})
    pack_cache(path, tmp_path / "good.tar")
    name = f"{path.name}/files/blob.bin"
    sparse = tarfile.TarInfo(name)
    sparse.size = 10
    sparse.pax_headers = {"GNU.sparse.map": "0,10", "GNU.sparse.realsize": str(len(blob))}
    pack = rewrite_pack(tmp_path / "good.tar", tmp_path / "sparse.tar", replace={name: (sparse, blob[:10])})
    assert pack.stat().st_size < len(blob)
    with pytest.raises(CorruptCacheError, match="blob.bin' is a sparse file"):
        install_pack(pack, tmp_path / "bob")
    assert visible(tmp_path / "bob") == []


def test_pack_is_refused_before_unpacking_when_the_disk_lacks_room(tmp_path, monkeypatch):
    path = write_cache(tmp_path / "c", rows_of(range(2)))
    pack_cache(path, tmp_path / "p.tar")
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("cache_schema.pack.shutil.disk_usage", lambda _: free._replace(free=1000))
    with pytest.raises(CacheError, match="unpacking needs .* free"):
        install_pack(tmp_path / "p.tar", tmp_path / "bob")
    assert visible(tmp_path / "bob") == []


@pytest.mark.parametrize("extra", ["files/evil.json", "segments/seg-00000.zarr/tokens/c/9/0/0/0", ".readers/x"])
def test_pack_member_not_listed_in_the_checksums_is_refused(tmp_path, extra):
    path = write_cache(tmp_path / "c", rows_of(range(2)))
    pack_cache(path, tmp_path / "good.tar")
    pack = rewrite_pack(tmp_path / "good.tar", tmp_path / "extra.tar",
                        extra=[file_member(f"{path.name}/{extra}", b"x" * 64)])
    with pytest.raises(CorruptCacheError, match="is not listed in the manifest's checksums; refused"):
        install_pack(pack, tmp_path / "bob")
    assert visible(tmp_path / "bob") == []


def test_merge_does_not_adopt_files_the_source_does_not_list(tmp_path):
    dst = write_cache(tmp_path / "dst", rows_of([0]))
    src = write_cache(tmp_path / "src", rows_of([1]), files={"a.json": b"1"})
    (src / "files" / "evil.json").write_text("{}")
    before = content(dst)
    with pytest.raises(CorruptCacheError, match="files/evil.json is present but not listed"):
        merge(src, dst)
    assert content(dst) == before and not (dst / "files" / "evil.json").exists()


@pytest.mark.parametrize("field", ["agent", "dataset"])
def test_pack_whose_manifest_names_another_agent_or_dataset_than_its_fields_is_refused(tmp_path, field):
    path = write_cache(tmp_path / "c", rows_of(range(1)))
    pack_cache(path, tmp_path / "good.tar")

    def relabel(name, data):
        if not name.endswith("/manifest.json"):
            return data
        return json.dumps({**json.loads(data), field: "dino" if field == "agent" else "imagenet"}).encode()

    pack = rewrite_pack(tmp_path / "good.tar", tmp_path / "relabelled.tar", edit=relabel)
    with pytest.raises(CorruptCacheError, match=f"manifest says {field} .* its fields .* say"):
        install_pack(pack, tmp_path / "bob")
    assert visible(tmp_path / "bob") == []


def test_fingerprint_mismatch_message_shows_both_values(tmp_path):
    path = write_cache(tmp_path / "c", rows_of(range(1)))
    pack_cache(path, tmp_path / "good.tar")
    forged = "0123456789abcdef"

    def edit(name, data):
        return json.dumps({**json.loads(data), "fingerprint": forged}).encode() if name.endswith("manifest.json") \
            else data

    pack = rewrite_pack(tmp_path / "good.tar", tmp_path / "forged.tar", edit=edit)
    with pytest.raises(CorruptCacheError) as info:
        install_pack(pack, tmp_path / "bob")
    assert forged in str(info.value) and path.name in str(info.value)
    save_manifest(path, {**manifest_of(path), "fingerprint": forged})
    [problem] = verify(path)
    assert forged in problem and f"name is {path.name}" in problem


# ------------------------------------------------------------------------------- bad input gets a sentence
BAD_MANIFESTS = {"not-json": '{"schema_version": 2, "fields": ', "list": "[1, 2]", "no-fields": None}


def spoil_manifest(path: Path, kind: str) -> None:
    if kind == "no-fields":
        manifest = manifest_of(path)
        del manifest["fields"]
        save_manifest(path, manifest)
    else:
        (path / "manifest.json").write_text(BAD_MANIFESTS[kind])


def assert_sentence(result, *needles):
    """A CLI failure that is one message, not a traceback."""
    assert isinstance(result.exception, SystemExit) and result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output


@pytest.mark.parametrize("kind", BAD_MANIFESTS)
def test_bad_manifest_gets_a_sentence_in_cache_verify_and_ls(tmp_path, kind):
    path = write_cache(tmp_path, rows_of(range(1)))
    spoil_manifest(path, kind)
    assert len(verify(path)) == 1 and "manifest.json" in verify(path)[0]
    assert_sentence(CliRunner().invoke(cli, ["cache", "verify", "--cache-root", str(tmp_path)]), "manifest.json")
    listing = CliRunner().invoke(cli, ["cache", "ls", "--cache-root", str(tmp_path)])
    assert listing.exit_code == 0 and "unreadable" in listing.output, listing.output
    assert f"{path}/manifest.json" in listing.output


@pytest.mark.parametrize("kind", BAD_MANIFESTS)
def test_bad_manifest_gets_a_sentence_in_distill_cache_lookup(tmp_path, kind):
    from distill.data import open_teachers

    path = write_cache(tmp_path, rows_of(range(1)))
    spoil_manifest(path, kind)
    for pins in ({}, {"toy": path.name}):
        with pytest.raises(CorruptCacheError, match="manifest.json"):
            open_teachers(tmp_path, "toyset", "abc", ["toy"], ["a"], "all", pins)


def test_bad_manifest_gets_a_sentence_in_extract(tmp_path):
    from extract.runner import planned_path
    from pipelines.extraction import ExtractOptions, build_jobs

    options = ExtractOptions(dataset="synthetic", data_root=tmp_path / "data", cache_root=tmp_path / "cache",
                             preset="tiny", agents="bert", shots=(1,), seeds=(1,))
    [job] = build_jobs(options)
    path = planned_path(job, options.cache_root)
    path.mkdir(parents=True)
    (path / "rows.json").write_text("[]\n")
    for kind in BAD_MANIFESTS:
        (path / "manifest.json").write_text(json.dumps({"schema_version": 2, "fields": {}, "status": "complete"}))
        spoil_manifest(path, kind)
        result = CliRunner().invoke(cli, ["extract", "--dataset", "synthetic", "--preset", "tiny", "--agents",
                                          "bert", "--shots", "1", "--seeds", "1", "--data-root", str(options.data_root),
                                          "--cache-root", str(options.cache_root), "--dry-run"])
        assert_sentence(result, f"{path}/manifest.json")


@pytest.mark.parametrize("kind", BAD_MANIFESTS)
def test_bad_manifest_gets_a_sentence_in_pull(tmp_path, kind):
    path = write_cache(tmp_path / "alice", rows_of(range(1)))
    url = (tmp_path / "remote").as_uri()
    push(path, url)
    local = write_cache(tmp_path / "bob", rows_of(range(1)))          # an identical cache whose manifest broke
    spoil_manifest(local, kind)
    result = CliRunner().invoke(cli, ["cache", "pull", url, "--cache-root", str(tmp_path / "bob")])
    assert_sentence(result, f"{local}/manifest.json")
    pack = next((tmp_path / "remote").rglob("*.tar"))                  # a pack whose own manifest is broken
    spoiled = tmp_path / "spoiled"
    shutil.copytree(path, spoiled / path.name)
    spoil_manifest(spoiled / path.name, kind)
    bad_manifest = (spoiled / path.name / "manifest.json").read_bytes()
    rewrite_pack(pack, tmp_path / "bad.tar", edit=lambda n, d: bad_manifest if n.endswith("manifest.json") else d)
    result = CliRunner().invoke(cli, ["cache", "pull", (tmp_path / "bad.tar").as_uri(),
                                      "--cache-root", str(tmp_path / "carol")])
    assert_sentence(result, "manifest.json")
    assert visible(tmp_path / "carol") == []


@pytest.mark.parametrize("entry", [{"schema_version": "1"}, {"rows": "12"}, {"sha256": 5}, {"dataset": ["toyset"]},
                                   {"created": "yesterday"}])
def test_index_entry_with_wrong_types_gets_a_sentence_in_pull_and_push(tmp_path, entry):
    path = write_cache(tmp_path / "alice", rows_of(range(1)))
    url = (tmp_path / "remote").as_uri()
    push(path, url)
    index = tmp_path / "remote" / "index.json"
    [good] = json.loads(index.read_text())
    index.write_text(json.dumps([{**good, **entry}]))
    [(field, value)] = entry.items()
    for attempt in (lambda: pull(url, tmp_path / "bob"), lambda: push(path, url, replace=True)):
        with pytest.raises(RemoteError, match=re.escape(f"index.json: entry 0 has {field} {value!r}, not")):
            attempt()
    assert visible(tmp_path / "bob") == []


def test_schema_version_as_a_string_gets_a_sentence(tmp_path):
    path = write_cache(tmp_path, rows_of(range(1)))
    save_manifest(path, {**manifest_of(path), "schema_version": "1"})
    with pytest.raises(SchemaVersionError) as info:
        CacheReader(path)
    assert "schema_version is '1'" in str(info.value) and "integer" in str(info.value)
    assert "schema_version is '1'" in verify(path)[0]


@pytest.mark.parametrize("damage", ["truncated", "headerless"])
def test_truncated_or_headerless_hdf5_segment_gets_a_sentence(tmp_path, damage):
    path = write_cache(tmp_path, rows_of(range(2)), "hdf5")
    segment = path / "segments" / "seg-00000.h5"
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(8) + data[8:])
    with pytest.raises(CorruptCacheError, match=r"seg-00000\.h5"):
        CacheReader(path)


def test_row_count_larger_than_the_row_table_gets_a_sentence(tmp_path):
    path = write_cache(tmp_path, rows_of(range(2)))
    manifest = manifest_of(path)
    manifest["segments"][0]["rows"] += 3
    manifest["rows"] += 3
    save_manifest(path, manifest)
    with pytest.raises(CorruptCacheError, match=r"counts 7 row\(s\) in its segments .* rows\.json holds 4"):
        CacheReader(path)


def test_pack_to_an_existing_directory_gets_a_sentence(tmp_path):
    path = write_cache(tmp_path / "c", rows_of(range(1)))
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(cli, ["cache", "pack", str(path), "-o", str(tmp_path / "out")])
    assert_sentence(result, "-o/--out", "is a directory")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(CacheError, match="is a directory"):
        pack_cache(path, tmp_path / "out")
