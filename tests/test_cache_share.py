"""Sharing caches: deterministic packs, push/pull through file:// and http://, tamper detection, merge, gc."""
import functools
import io
import json
import os
import socket
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema import (AgentCache, ArraySpec, CacheReader, CorruptCacheError, DivergedCacheError,
                          FingerprintMismatch, MergeConflict, PartialCacheError, SchemaVersionError, verify)
from cache_schema.gc import remove_cache
from cache_schema.install import install_pack
from cache_schema.leases import reading
from cache_schema.merge import merge
from cache_schema.pack import pack_cache
from pipelines.commands.cache import cache as cache_cli
from pipelines.share import RemoteError, pull, push, read_index

ARRAYS = {"tokens": ArraySpec((2, 3, 4), "float16"), "token_mean": ArraySpec((2, 4), "float32"),
          "views": ArraySpec((5,), "int32")}
FIELDS = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}


def keys_rows(keys, views=2):
    return [(f"class_{k % 3}/img_{k}.png", v) for k in keys for v in range(views)]


def row_values(row, salt=0):
    """Content derived from the row itself, so any misplaced or altered row is visible."""
    rng = np.random.default_rng([sum(row[0].encode()), len(row[0]), row[1], salt])
    return {"tokens": rng.standard_normal((2, 3, 4)).astype(np.float16),
            "token_mean": rng.standard_normal((2, 4)).astype(np.float32),
            "views": np.array([row[1], 0, 0, 8, 8], dtype=np.int32)}


def write_cache(root, rows, backend="zarr", fields=FIELDS, values=row_values, files=None):
    cache = AgentCache.open(root, fields["dataset"]["name"], fields["agent"]["name"], fields, ARRAYS, backend=backend)
    plan = cache.plan(rows)
    cache.create_segments()
    for name, local in plan[0]:
        with cache.segment_writer(name) as writer:
            batch = [values(writer.rows[i]) for i in local]
            writer.write(local, {k: np.stack([b[k] for b in batch]) for k in ARRAYS})
    for name, data in (files or {}).items():
        cache.add_file(name, data)
    cache.finalize()
    return cache.path


def assert_same_content(a, b, rows):
    ra, rb = CacheReader(a), CacheReader(b)
    assert sorted(ra.rows) == sorted(rb.rows) == sorted(rows)
    for name in ARRAYS:
        np.testing.assert_array_equal(ra.read(name, rows), rb.read(name, rows))


def visible_entries(root):
    """Everything under a cache root except the (empty) scratch directory of pulls."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                  if ".incoming" not in p.relative_to(root).parts)


@pytest.fixture
def http_remote(tmp_path):
    """An http:// server on 127.0.0.1 serving a directory (the file:// remote)."""
    directory = tmp_path / "remote"
    directory.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield directory, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------- pack
def test_pack_is_deterministic_and_clean(tmp_path):
    path = write_cache(tmp_path / "c", keys_rows(range(3)), files={"descriptions.json": b"{}"})
    (path / "segments" / "stray.tmp").write_bytes(b"half-written")
    with reading(path):
        first = pack_cache(path, tmp_path / "a.tar")
    os.utime(path / "rows.json", (1, 1))  # mtimes must not matter
    second = pack_cache(path, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first.sha256 == second.sha256 and first.bytes == (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:2] == [path.name, f"{path.name}/manifest.json"] and names[2:] == sorted(names[2:])
    assert all(n.startswith(path.name) for n in names)
    assert not any(n.endswith(".tmp") or ".readers" in n for n in names)
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}
    assert f"{path.name}/files/descriptions.json" in names


def test_pack_refuses_partial_other_schema_and_damage(tmp_path):
    partial = AgentCache.open(tmp_path / "p", "toyset", "toy", FIELDS, ARRAYS)
    with pytest.raises(PartialCacheError, match="partial"):
        pack_cache(partial.path, tmp_path / "p.tar")
    path = write_cache(tmp_path / "c", keys_rows(range(2)))
    chunk = path / "segments" / "seg-00000.zarr" / "token_mean" / "c" / "1" / "0" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(CorruptCacheError, match="segments/seg-00000.zarr/token_mean/c/1/0/0"):
        pack_cache(path, tmp_path / "c.tar")
    assert not (tmp_path / "c.tar").exists() and not (tmp_path / "c.tar.tmp").exists()
    chunk.write_bytes(original)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 999}))
    with pytest.raises(SchemaVersionError, match="999"):
        pack_cache(path, tmp_path / "c.tar")


# ---------------------------------------------------------------------------------------------- push / pull
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_push_pull_round_trip(tmp_path, backend):
    rows = keys_rows(range(4))
    path = write_cache(tmp_path / "alice", rows, backend, files={"descriptions.json": b'{"a": ["x"]}'})
    url = (tmp_path / "remote").as_uri()
    entry, status = push(path, url)
    assert status == "pushed"
    pack = tmp_path / "remote" / "toyset" / "toy" / f"{path.name}.tar"
    [listed] = read_index(url)
    assert listed == entry and listed["rows"] == len(rows) and listed["bytes"] == pack.stat().st_size
    assert listed["schema_version"] == 2 and len(listed["sha256"]) == 64
    assert push(path, url)[1] == "present"

    [result] = pull(url, tmp_path / "bob", dataset="toyset", agent="toy", fingerprint=path.name)
    assert result.status == "installed" and result.path == tmp_path / "bob" / "toyset" / "toy" / path.name
    assert verify(result.path) == []
    assert_same_content(path, result.path, rows)
    assert CacheReader(result.path).file("descriptions.json") == b'{"a": ["x"]}'
    assert visible_entries(tmp_path / "bob")[:3] == ["toyset", "toyset/toy", f"toyset/toy/{path.name}"]
    assert [r.status for r in pull(url, tmp_path / "bob")] == ["present"]


def test_pull_everything_filters_and_single_pack_url(tmp_path):
    url = (tmp_path / "remote").as_uri()
    one = write_cache(tmp_path / "a", keys_rows(range(2)))
    two = write_cache(tmp_path / "a", keys_rows(range(2)), fields={**FIELDS, "agent": {"name": "other"}})
    push(one, url)
    push(two, url)
    assert len(read_index(url)) == 2
    results = pull(url, tmp_path / "b")
    assert sorted(r.path.name for r in results) == sorted([one.name, two.name])
    with pytest.raises(RemoteError, match="no cache matching agent=nobody"):
        pull(url, tmp_path / "c", agent="nobody")
    [single] = pull(f"{url}/toyset/toy/{one.name}.tar", tmp_path / "c")
    assert single.status == "installed" and verify(single.path) == []


def test_http_pull_and_read_only_push(tmp_path, http_remote):
    directory, url = http_remote
    rows = keys_rows(range(3))
    path = write_cache(tmp_path / "alice", rows, "hdf5")
    push(path, directory.as_uri())
    [result] = pull(url, tmp_path / "bob")
    assert result.status == "installed" and verify(result.path) == []
    assert_same_content(path, result.path, rows)
    with pytest.raises(RemoteError, match="read-only"):
        push(path, url)


def test_unreachable_urls_are_named(tmp_path, http_remote):
    _, url = http_remote
    with pytest.raises(RemoteError, match=f"{url}/nothing-here"):
        pull(f"{url}/nothing-here", tmp_path / "bob")
    missing = (tmp_path / "no-such-remote").as_uri()
    with pytest.raises(RemoteError, match="no-such-remote"):
        pull(missing, tmp_path / "bob")
    with pytest.raises(RemoteError, match="127.0.0.1:9"):
        pull("http://127.0.0.1:9/remote", tmp_path / "bob")


def _flip_byte_in_member(pack: Path, member_suffix: str) -> str:
    with tarfile.open(pack) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(member_suffix))
    data = bytearray(pack.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    return member.name.split("/", 1)[1]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_tampered_or_truncated_pack_is_refused_and_nothing_is_visible(tmp_path, backend):
    path = write_cache(tmp_path / "alice", keys_rows(range(3)), backend)
    url = (tmp_path / "remote").as_uri()
    push(path, url)
    pack = tmp_path / "remote" / "toyset" / "toy" / f"{path.name}.tar"
    original = pack.read_bytes()
    altered = _flip_byte_in_member(pack, "seg-00000.h5" if backend == "hdf5" else "tokens/c/3/0/0/0")
    bob = tmp_path / "bob"
    with pytest.raises(CorruptCacheError, match="sha256") as info:
        pull(url, bob)
    assert f"checksum mismatch in {altered}" in str(info.value)
    assert visible_entries(bob) == [] and not any((bob / ".incoming").iterdir())

    with pytest.raises(CorruptCacheError, match=f"checksum mismatch in {altered}"):  # no index: checksums catch it
        install_pack(pack, bob)
    assert visible_entries(bob) == []

    pack.write_bytes(original[: len(original) // 2])
    with pytest.raises(CorruptCacheError, match="truncated"):
        pull(url, bob)
    assert visible_entries(bob) == []
    pack.write_bytes(original)
    assert [r.status for r in pull(url, bob)] == ["installed"]


def _tar_of(tmp_path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    out = tmp_path / "crafted.tar"
    with tarfile.open(out, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


@pytest.mark.parametrize("bad", ["../escape", "/abs/file", "link"])
def test_unsafe_members_are_refused(tmp_path, bad):
    info = tarfile.TarInfo(bad if bad != "link" else "fp/manifest.json")
    if bad == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        data = None
    else:
        data = b"x"
        info.size = 1
    pack = _tar_of(tmp_path, [(info, data)])
    with pytest.raises(CorruptCacheError, match="refused"):
        install_pack(pack, tmp_path / "root")
    assert not (tmp_path / "escape").exists() and visible_entries(tmp_path / "root") == []


def test_pack_of_another_schema_version_is_refused(tmp_path):
    path = write_cache(tmp_path / "c", keys_rows(range(1)))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3}))
    pack = tmp_path / "v3.tar"
    with tarfile.open(pack, "w") as tar:
        tar.add(path, arcname=path.name)
    with pytest.raises(SchemaVersionError, match="version 3.*1 and 2"):
        install_pack(pack, tmp_path / "root")
    assert visible_entries(tmp_path / "root") == []


def test_existing_cache_with_other_rows_is_not_overwritten(tmp_path):
    url = (tmp_path / "remote").as_uri()
    push(write_cache(tmp_path / "alice", keys_rows(range(3))), url)
    mine = write_cache(tmp_path / "bob", keys_rows(range(2)))
    before = (mine / "rows.json").read_bytes()
    with pytest.raises(DivergedCacheError, match="merge the two"):
        pull(url, tmp_path / "bob")
    refused = CliRunner().invoke(cache_cli, ["pull", url, "--cache-root", str(tmp_path / "bob")])
    assert refused.exit_code == 1 and "`transagent cache merge`" in refused.output   # the command line's hint
    assert (mine / "rows.json").read_bytes() == before
    with pytest.raises(RemoteError, match="--replace"):
        push(mine, url)
    assert push(mine, url, replace=True)[1] == "replaced"
    assert read_index(url)[0]["rows"] == 4


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("backends", [("zarr", "zarr"), ("hdf5", "zarr")])
def test_merge_equals_one_go(tmp_path, backends):
    seed1, seed2 = keys_rows([0, 1, 2, 3]), keys_rows([2, 3, 4, 5])   # seeds share keys 2 and 3
    dst = write_cache(tmp_path / "dst", seed1, backends[1], files={"a.json": b"1"})
    src = write_cache(tmp_path / "src", seed2, backends[0], files={"a.json": b"1", "b.json": b"2"})
    one_go = write_cache(tmp_path / "one", sorted(set(seed1 + seed2)))
    result = merge(src, dst)
    assert (result.added_rows, result.skipped_rows, result.added_files) == (4, 4, ["b.json"])
    assert verify(dst) == []
    assert_same_content(dst, one_go, sorted(set(seed1 + seed2)))
    manifest = json.loads((dst / "manifest.json").read_text())
    assert [s["name"] for s in manifest["segments"]] == ["seg-00000", "seg-00001"]
    assert CacheReader(dst).file("b.json") == b"2"
    again = merge(src, dst)
    assert (again.added_rows, again.skipped_rows) == (0, 8)


def test_merge_conflict_names_the_key_and_changes_nothing(tmp_path):
    dst = write_cache(tmp_path / "dst", keys_rows([0, 1]))
    src = write_cache(tmp_path / "src", keys_rows([1, 2]),
                      values=lambda row: row_values(row, salt=1 if row == ("class_1/img_1.png", 1) else 0))
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with pytest.raises(MergeConflict, match=r"key 'class_1/img_1.png', view 1"):
        merge(src, dst)
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file() and ".writer" not in p.parts} == before


def test_merge_of_different_fingerprints_names_the_fields(tmp_path):
    dst = write_cache(tmp_path / "dst", keys_rows([0]))
    src = write_cache(tmp_path / "src", keys_rows([1]),
                      fields={**FIELDS, "dataset": {"name": "toyset", "split_hash": "zzz"}})
    with pytest.raises(FingerprintMismatch, match="dataset.split_hash") as info:
        merge(src, dst)
    assert info.value.differing == ["dataset.split_hash"]
    result = CliRunner().invoke(cache_cli, ["merge", str(src), str(dst)])
    assert result.exit_code == 1 and "dataset.split_hash" in result.output


# ---------------------------------------------------------------------------------------------- cli: ls, verify, gc
def test_ls_and_verify(tmp_path):
    root = tmp_path / "cache"
    good = write_cache(root, keys_rows(range(3), views=4))
    partial = AgentCache.open(root, "toyset", "part", FIELDS, ARRAYS)
    runner = CliRunner()
    listing = runner.invoke(cache_cli, ["ls", "--cache-root", str(root)])
    assert listing.exit_code == 0, listing.output
    table = {line.split()[1]: line.split() for line in listing.output.splitlines()[1:]}
    assert table["toy"][:5] == ["toyset", "toy", good.name, "12", "4"] and "complete" in table["toy"]
    assert table["part"][:5] == ["toyset", "part", partial.path.name, "0", "0"] and "partial" in table["part"]
    assert runner.invoke(cache_cli, ["verify", str(good)]).exit_code == 0
    result = runner.invoke(cache_cli, ["verify", "--cache-root", str(root)])
    assert result.exit_code == 1 and "status is 'partial'" in result.output
    out = tmp_path / "x.tar"
    packed = runner.invoke(cache_cli, ["pack", str(good), "-o", str(out)])
    assert packed.exit_code == 0 and out.exists()
    refused = runner.invoke(cache_cli, ["pack", str(partial.path)])
    assert refused.exit_code == 1 and "partial" in refused.output


def test_gc_dry_run_apply_and_reading_lease(tmp_path):
    root, runs = tmp_path / "cache", tmp_path / "runs"
    used = write_cache(root, keys_rows([0]))
    unused = write_cache(root, keys_rows([0]), fields={**FIELDS, "agent": {"name": "v2"}})
    partial = AgentCache.open(root, "toyset", "part", FIELDS, ARRAYS).path
    runner = CliRunner()

    def gc(*extra):
        result = runner.invoke(cache_cli, ["gc", "--cache-root", str(root), "--runs-root", str(runs), *extra])
        assert result.exit_code == 0, result.output
        return result.output

    out = gc()  # no runs: only the partial cache is garbage
    assert "would delete" in out and str(partial) in out and str(unused) not in out
    run_dir = runs / "toyset" / "base2novel" / "shots16" / "seed1" / "default"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"caches": {"toy": used.relative_to(root).as_posix()}}))
    (runs / "other").mkdir()
    (runs / "other" / "config.json").write_text(json.dumps({"caches": [str(partial)]}))  # list, absolute
    out = gc()
    assert str(unused) in out and "partial cache" in out and str(used) not in out
    assert unused.exists() and partial.exists()
    stale = unused / ".readers" / "2147483646@nohost-0000"   # another host: counts as alive
    with reading(unused) as lease:
        assert lease.exists()
        out = gc("--apply")
    assert "in use" in out and unused.exists() and not partial.exists()
    assert not lease.exists()
    stale.write_text("")
    assert "in use" in gc("--apply") and unused.exists()
    stale.unlink()
    dead = unused / ".readers" / f"2147483646@{socket.gethostname()}-0000"  # this host, dead pid
    dead.write_text("")
    gc("--apply")
    assert not unused.exists() and used.exists() and verify(used) == []
    assert "nothing to collect" in gc("--apply")


@pytest.mark.parametrize("spoil", ["{not json", json.dumps({"schema_version": 3, "status": "partial"})])
def test_gc_reports_a_cache_it_cannot_read_and_keeps_it(tmp_path, spoil):
    """Before, gc --apply deleted a cache whose manifest it could not read (damaged, or of a newer schema): what
    such a cache holds is unknown, so it is reported and kept."""
    root, runs = tmp_path / "cache", tmp_path / "runs"
    path = write_cache(root, keys_rows([0]))
    (path / "manifest.json").write_text(spoil)
    result = CliRunner().invoke(cache_cli, ["gc", "--apply", "--cache-root", str(root), "--runs-root", str(runs)])
    assert result.exit_code == 0, result.output
    assert f"unreadable {path}" in result.output and "kept" in result.output and "deleted" not in result.output
    assert (path / "rows.json").exists()
    assert remove_cache(path, root, status="unreadable") is False and (path / "rows.json").exists()
