"""`transagent agents check` (tiny preset, a local path, the hub cache offline), the published checkpoints that are
downloaded, pinned and converted at first use, the skip of agents needing a manual step, and the refusal to
combine rows of two resolved hub commits."""
import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

import agent_checkpoints as ckpt
from cache_schema import AgentCache, ArraySpec, FingerprintMismatch
from cache_schema.fingerprint import sha256_file
from cache_schema.install import install_pack
from cache_schema.merge import merge
from cache_schema.pack import pack_cache
from pipelines.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def rows(output):
    """The --json rows (stderr, where progress bars go, is mixed into the output)."""
    lines = [line[line.index('{"agent"'):] for line in output.splitlines() if '{"agent"' in line]
    return {entry["agent"]: entry for entry in map(json.loads, lines)}


@pytest.fixture
def no_full_collections(monkeypatch):
    """Freeing an agent runs gc.collect(), ~0.5 s in a test process full of models; these tests measure no memory."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, no_full_collections):
    """An empty Hugging Face cache, offline: whatever is placed in it is all there is."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("TRANSAGENT_REGISTRY", "TRANSAGENT_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    return cache


def place_in_hub_cache(cache, repo_id, directory, commit=COMMIT):
    """Lay `directory` out as huggingface_hub does: blobs named by content hash, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(directory.iterdir()):
        data = file.read_bytes()
        # LFS files (weights) are stored under their sha256, small git files under their git blob sha1
        blob = (hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


# ---- agents check -----------------------------------------------------------------------------------------------

def test_check_on_the_tiny_preset_reports_each_agent_and_its_cache(tmp_path):
    from pipelines.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=2, per_class=(2, 1, 1))
    result = invoke("agents", "check", "--preset", "tiny", "--agents", "dino,bert", "--dataset", "synthetic",
                    "--shots", "1", "--data-root", tmp_path / "data", "--cache-root", tmp_path / "cache",
                    "--device", "cpu", "--forward", "--json")
    assert result.exit_code == 0, result.output
    found = rows(result.output)
    assert sorted(found) == ["bert", "dino"] and all(r["status"] == "ok" for r in found.values())
    dino = found["dino"]
    assert dino["source"] == "tiny-random (seed 0)" and dino["dtypes"] == ["float32"]
    assert dino["parameters"] > 0 and dino["weight_bytes"] >= 4 * dino["parameters"]
    assert dino["forward_bytes"] is not None and dino["cache_bytes"] > 0 and dino["models"] == []
    assert "agents check: 2 ok, 0 failed, 0 skipped" in result.output
    assert not (tmp_path / "cache").exists()  # a check writes no cache


def test_check_a_local_path_and_the_hub_cache_offline(tmp_path, offline_hub):
    from extract.agents import LoadRequest, get_agent

    local = ckpt.save_dino(tmp_path / "dino-local", pooler=True)
    result = invoke("agents", "check", "--agents", "dino", "--agent-path", f"dino={local}", "--device", "cpu",
                    "--cache-root", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.output
    row = rows(result.output)["dino"]
    assert row["source"] == f"local:{local}" and row["commit"] is None and row["models"] == ["ViTModel"]
    assert row["unexpected"] == ["ViTModel: pooler.dense.bias", "ViTModel: pooler.dense.weight"]
    assert row["weights"]["model.safetensors"] == sha256_file(local / "model.safetensors")

    # empty cache, offline: a clear error naming the agent and the offline routes, and a non-zero exit code
    # (offline, mae's checkpoint is not downloaded either: the error says where to place it)
    missing = invoke("agents", "check", "--agents", "dino,mae", "--device", "cpu", "--cache-root", tmp_path / "c2")
    assert missing.exit_code == 1 and "cannot run: dino, mae" in missing.output
    assert "agent 'dino': cannot load facebook/dino-vitb16" in missing.output
    assert "--agent-path dino=DIR" in missing.output
    assert "offline (HF_HUB_OFFLINE=1), not downloading" in missing.output
    assert f"place the file at {tmp_path / 'c2' / 'weights' / 'mae' / 'mae_pretrain_vit_base.pth'}" in missing.output

    # the same checkpoint in the hub cache: the resolved commit and the blob's sha256 are reported and recorded
    snapshot = place_in_hub_cache(offline_hub, "facebook/dino-vitb16", ckpt.save_dino(tmp_path / "dino-hub"))
    found = invoke("agents", "check", "--agents", "dino", "--device", "cpu", "--json")
    assert found.exit_code == 0, found.output
    row = rows(found.output)["dino"]
    assert row["source"] == "facebook/dino-vitb16" and row["commit"] == COMMIT
    blob = (snapshot / "model.safetensors").resolve().name
    assert row["weights"] == {"model.safetensors": blob} == {"model.safetensors": sha256_file(snapshot /
                                                                                            "model.safetensors")}
    runtime = get_agent("dino").load(LoadRequest(tiny=False, student=ckpt.STUDENT))
    assert runtime.source == {"source": "facebook/dino-vitb16", "commit": COMMIT}  # what the manifest records


def test_the_check_loads_vicunas_llm_only_when_it_generates(tmp_path):
    from types import SimpleNamespace

    from extract.agents import LoadRequest
    from extract.agents.vicuna import VicunaRuntime

    text_encoder = SimpleNamespace(dim=4)  # the student's CLIP: not what this is about
    generating = VicunaRuntime(text_encoder, LoadRequest(tiny=True, student=ckpt.STUDENT))
    generating.preflight()
    assert generating._llm is not None
    reading = VicunaRuntime(text_encoder, LoadRequest(tiny=True, student=ckpt.STUDENT,
                                                      options={"descriptions": str(tmp_path / "d.json")}))
    reading.preflight()
    assert reading._llm is None


def test_blob_names_are_used_without_hashing(tmp_path):
    from extract.preflight import file_sha256

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("ab" * 32)).write_bytes(b"weights")
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "blobs" / ("ab" * 32))
    assert file_sha256(tmp_path / "model.safetensors") == "ab" * 32  # the hub already hashed it
    (tmp_path / "copy.safetensors").write_bytes(b"weights")
    assert file_sha256(tmp_path / "copy.safetensors") == hashlib.sha256(b"weights").hexdigest()


# ---- published checkpoints: download, pin, convert --------------------------------------------------------------

@pytest.fixture
def mae_server(tmp_path, monkeypatch):
    """A local http server with a tiny official-format MAE checkpoint; the registry file points mae at it."""
    import torch

    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": ckpt.official_mae_weights()}, served / "mae_pretrain_vit_base.pth")
    requests = []

    class Counting(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(served)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mae_pretrain_vit_base.pth"
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"datasets": {}, "agents": {"mae": {"url": url}}}))
    monkeypatch.setenv("TRANSAGENT_REGISTRY", str(registry))
    monkeypatch.delenv("TRANSAGENT_WEIGHTS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the server is local
    yield served / "mae_pretrain_vit_base.pth", requests, registry
    server.shutdown()
    server.server_close()


def test_mae_is_downloaded_pinned_converted_once_and_verified(tmp_path, mae_server, no_full_collections):
    served, requests, registry = mae_server
    check = ["agents", "check", "--agents", "mae", "--device", "cpu", "--cache-root", tmp_path / "cache", "--json"]
    first = invoke(*check)
    assert first.exit_code == 0, first.output
    weights = tmp_path / "cache" / "weights" / "mae"
    pin = json.loads((weights / "pinned.json").read_text())
    assert pin["sha256"] == sha256_file(served) and pin["file"] == "mae_pretrain_vit_base.pth"
    row = rows(first.output)["mae"]
    assert row["weights"] == {"mae_pretrain_vit_base.pth": pin["sha256"]} and row["models"] == ["ViTMAEModel"]
    assert row["source"] == f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth -> " \
                            f"{weights / 'converted'}"
    assert len(requests) == 1 and (weights / "converted" / "conversion.json").is_file()

    assert invoke(*check).exit_code == 0 and len(requests) == 1  # converted once: no download, no conversion

    # upstream changes the file: a fresh download no longer matches the pin and is refused
    import torch

    torch.save({"model": ckpt.official_mae_weights(seed=1)}, served)
    for path in (weights / "mae_pretrain_vit_base.pth", weights / "converted" / "conversion.json"):
        path.unlink()
    changed = invoke(*check)
    assert changed.exit_code == 1 and f"expected {pin['sha256']} (pinned.json)" in changed.output

    # a registry hash that disagrees with the pin is refused before anything is downloaded
    registry.write_text(json.dumps({"agents": {"mae": {"url": "http://127.0.0.1:1/x.pth", "sha256": "0" * 64}}}))
    assert "remove pinned.json to re-pin" in invoke(*check).output


def test_extract_downloads_checks_skips_shikra_and_reruns_without_loading(tmp_path, mae_server,
                                                                          no_full_collections):
    from pipelines.datasets import make_synthetic

    served, requests, _ = mae_server
    make_synthetic(tmp_path / "data", num_classes=2, per_class=(2, 1, 1))
    args = ["extract", "--dataset", "synthetic", "--preset", "paper", "--agents", "mae,shikra", "--shots", "1",
            "--views", "1", "--layers", "0", "--device", "cpu", "--data-root", tmp_path / "data",
            "--cache-root", tmp_path / "cache"]
    strict = invoke(*args, "--strict")
    assert strict.exit_code == 1 and "shikra" in strict.output and "LLaMA-7B" in strict.output
    assert not requests  # refused before any download

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("skipped 1 agent(s): shikra:") for line in lines) == 1
    assert "mae     ok      https://" in result.output and "agents check: 1 ok" in result.output
    (manifest,) = (tmp_path / "cache").glob("synthetic/mae/*/manifest.json")
    fields = json.loads(manifest.read_text())["fields"]["agent"]
    assert fields["local_weights"] == {"mae_pretrain_vit_base.pth": sha256_file(served)}
    assert fields["source"] == "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"

    again = invoke(*args)
    assert again.exit_code == 0 and "1 already complete" in again.output
    assert "agents check" not in again.output and len(requests) == 1


# ---- rows of two resolved commits are never combined ------------------------------------------------------------

ARRAYS = {"class_features": ArraySpec((4,), "float32")}
FIELDS = {"agent": {"name": "bert", "source": "sentence-transformers/all-MiniLM-L6-v2"}, "dataset": {"name": "toy"}}


def commit_cache(root, names, commit):
    cache = AgentCache.open(root, "toy", "bert", FIELDS, ARRAYS)
    plan = cache.plan([(name, 0) for name in names])
    cache.create_segments()
    for segment, local in plan[0]:
        with cache.segment_writer(segment) as writer:
            writer.write(local, {"class_features": np.ones((len(local), 4), np.float32)})
    cache.set_provenance("source", {"source": FIELDS["agent"]["source"], "commit": commit})
    cache.finalize()
    return cache.path


def test_merge_and_pull_refuse_rows_of_another_resolved_commit(tmp_path):
    other = "f" * 40
    mine = commit_cache(tmp_path / "a", ["cat", "dog"], COMMIT)
    theirs = commit_cache(tmp_path / "b", ["cow"], other)
    assert mine.name == theirs.name  # unpinned: one fingerprint for both
    with pytest.raises(FingerprintMismatch, match=f"(?s){COMMIT}.*{other}.*refusing to combine"):
        merge(theirs, mine)
    pack = pack_cache(theirs, tmp_path / "theirs.tar")
    with pytest.raises(FingerprintMismatch, match=f"(?s){COMMIT}.*{other}"):
        install_pack(tmp_path / "theirs.tar", tmp_path / "a")
    assert pack.sha256 and merge(commit_cache(tmp_path / "c", ["cow"], COMMIT), mine).added_rows == 1


def test_a_resumed_extraction_never_adds_rows_of_another_commit(tmp_path, no_full_collections):
    """The runner, like merge and pull: a partial cache from commit A is not finished with commit B's weights."""
    from dataclasses import replace

    from extract.agents import LoadRequest, get_agent
    from extract.families import ExtractContext
    from extract.runner import AgentJob, cache_fields, run

    class Runtime:  # a language agent whose weights resolved to another commit
        dim, resolved_revision = 4, "f" * 40

        def descriptions(self, classnames, ctx):
            return None

        def class_features(self, classnames, ctx):
            return np.ones((len(classnames), 4), np.float32)

    ctx = ExtractContext(dataset="toy", image_root=tmp_path, keys=[], classnames=["cat", "dog"], template="a {}.",
                         student=ckpt.STUDENT)
    job = AgentJob(replace(get_agent("bert"), load=lambda request: Runtime()), ctx,
                   LoadRequest(tiny=False, student=ckpt.STUDENT))
    partial = AgentCache.open(tmp_path / "cache", "toy", "bert", cache_fields(job), ARRAYS)
    plan = partial.plan([("cat", 0), ("dog", 0)])
    partial.create_segments()
    with partial.segment_writer(plan[0][0][0]) as writer:  # a run from COMMIT stopped after one row
        writer.write([0], {"class_features": np.zeros((1, 4), np.float32)})
    partial.set_provenance("resolved_revision", COMMIT)
    (report,) = run([job], tmp_path / "cache", progress=False)
    assert report.status == "failed" and COMMIT in report.error and "f" * 40 in report.error
