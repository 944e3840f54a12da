"""Agent weights published as checkpoint files (ViTDet-B, MAE): downloaded once, hash-pinned, converted.

Layout under the weights root (`$TRANSAGENT_WEIGHTS`, else `<cache root>/weights`):

    <agent>/<file>          the published checkpoint (e.g. model_final_61ccd1.pkl)
    <agent>/pinned.json     {"url", "file", "sha256"}: the hash of the first download (none is published);
                            every later download, or a file placed by hand, must match it
    <agent>/converted/      the transformers directory `extract.convert.<converter>` wrote (its conversion.json
                            names the source sha256), loaded as the agent's local path

A registry file (`$TRANSAGENT_REGISTRY`, JSON) may override an agent's URL and hash under its "agents" key:
{"agents": {"mae": {"url": "...", "sha256": "..."}}} (e.g. a mirror, or a test server).

The cache fingerprint holds the checkpoint's sha256 (not the converted files), so a complete cache is recognised
from pinned.json alone: no download, no conversion, no torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cache_schema.fingerprint import sha256_file
from extract.convert import get_converter
from extract.hub import hub_offline

WEIGHTS_ENV = "TRANSAGENT_WEIGHTS"
REGISTRY_ENV = "TRANSAGENT_REGISTRY"
PIN = "pinned.json"
CONVERTED = "converted"
CONVERSION_RECORD = "conversion.json"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """Where an agent's published checkpoint comes from and where it lives once converted."""

    agent: str
    url: str
    file: str              # file name under the agent's weights directory
    sha256: str | None     # expected: the registry file's, else the pinned one; None before the first download
    directory: Path        # <weights root>/<agent>
    converter: str

    @property
    def converted(self) -> Path:
        return self.directory / CONVERTED

    def identity(self) -> dict[str, str | None]:
        """The fingerprint part: the checkpoint file by its sha256 (None until it is known)."""
        return {self.file: self.sha256}


def weights_root(cache_root) -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or Path(cache_root) / "weights")


def registry_override(agent: str) -> dict:
    """{url?, sha256?} for `agent` from the registry file's "agents" key; {} when there is none."""
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{REGISTRY_ENV}={path}: cannot read it as JSON: {error}") from error
    agents = data.get("agents", {}) if isinstance(data, dict) else None
    if not isinstance(agents, dict):
        raise ValueError(f"{REGISTRY_ENV}={path}: 'agents' must map agent names to {{url, sha256}}")
    entry = agents.get(agent, {})
    if not isinstance(entry, dict) or set(entry) - {"url", "sha256"}:
        raise ValueError(f"{REGISTRY_ENV}={path}: agents.{agent} must be an object with 'url' and/or 'sha256'")
    if "url" in entry and not (isinstance(entry["url"], str) and urlparse(entry["url"]).scheme):
        raise ValueError(f"{REGISTRY_ENV}={path}: agents.{agent}.url {entry.get('url')!r} is not a URL")
    if "sha256" in entry and not (isinstance(entry["sha256"], str) and SHA256.match(entry["sha256"])):
        raise ValueError(f"{REGISTRY_ENV}={path}: agents.{agent}.sha256 must be 64 lower-case hex digits")
    return entry


def checkpoint(spec, cache_root) -> Checkpoint:
    """The agent's checkpoint as planned: URL and expected hash, without touching the network."""
    source = spec.source
    override = registry_override(spec.name)
    url = override.get("url", source.url)
    file = Path(urlparse(source.url).path).name
    directory = weights_root(cache_root) / spec.name
    pinned = _read_pin(directory)
    expected = override.get("sha256") or pinned
    if override.get("sha256") and pinned and pinned != override["sha256"]:
        raise ValueError(f"agent {spec.name!r}: {REGISTRY_ENV} gives sha256 {override['sha256'][:12]}..., "
                         f"{directory / PIN} pinned {pinned[:12]}... at the first download; remove {PIN} to re-pin")
    return Checkpoint(spec.name, url, file, expected, directory, source.converter)


def prepare(spec, cache_root) -> Checkpoint:
    """Download (if needed), verify and convert the agent's checkpoint; returns it with its sha256 known."""
    planned = checkpoint(spec, cache_root)
    if planned.sha256 and _converted_from(planned.converted) == planned.sha256:
        return planned
    planned.directory.mkdir(parents=True, exist_ok=True)
    raw = planned.directory / planned.file
    if raw.is_file():
        actual = sha256_file(raw)
    else:
        logger.info("downloading %s weights: %s", planned.agent, planned.url)
        actual = _download(planned.url, raw, planned.agent)
    if planned.sha256 and actual != planned.sha256:
        raise ValueError(f"agent {planned.agent!r}: {raw} has sha256 {actual}, expected {planned.sha256} "
                         f"({'the registry file' if registry_override(planned.agent).get('sha256') else PIN}); "
                         f"delete the file to download it again")
    if not planned.sha256:
        _write_pin(planned.directory, planned.url, planned.file, actual)
        logger.info("pinned %s weights %s: sha256 %s", planned.agent, planned.file, actual)
    done = Checkpoint(planned.agent, planned.url, planned.file, actual, planned.directory, planned.converter)
    if _converted_from(done.converted) != actual:
        logger.info("converting %s weights (%s) into %s", planned.agent, planned.converter, done.converted)
        _convert(done, raw)
    return done


def _download(url: str, target: Path, agent: str) -> str:
    """Stream `url` into `target` (aside, then renamed); returns its sha256. Offline (HF_HUB_OFFLINE=1) nothing
    is downloaded."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        if hub_offline():
            raise OSError("offline (HF_HUB_OFFLINE=1), not downloading")
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OSError(f"agent {agent!r}: cannot download {url}: {error}\nOffline routes: place the file at "
                      f"{target} (its sha256 is pinned at first use), or convert it yourself with `transagent "
                      f"agents convert {agent} FILE DIR` and pass --agent-path {agent}=DIR") from error
    return digest.hexdigest()


def _convert(checkpoint: Checkpoint, raw: Path) -> None:
    """Convert beside the target and rename; a concurrent process (another rank) that finished first wins."""
    work = checkpoint.directory / f"{CONVERTED}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        get_converter(checkpoint.converter)(raw, work)
        if _converted_from(checkpoint.converted) == checkpoint.sha256:
            return
        if checkpoint.converted.exists():  # converted from another checkpoint: set aside, then removed
            stale = checkpoint.directory / f"{CONVERTED}.stale-{os.getpid()}"
            os.rename(checkpoint.converted, stale)
            shutil.rmtree(stale)
        try:
            os.rename(work, checkpoint.converted)
        except OSError:
            if _converted_from(checkpoint.converted) != checkpoint.sha256:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _converted_from(directory: Path) -> str | None:
    try:
        return json.loads((directory / CONVERSION_RECORD).read_text()).get("source_sha256")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _read_pin(directory: Path) -> str | None:
    path = directory / PIN
    if not path.is_file():
        return None
    try:
        sha = json.loads(path.read_text())["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: unreadable ({error}); restore it or delete it to re-pin at the next "
                         "download") from None
    if not isinstance(sha, str) or not SHA256.match(sha):
        raise ValueError(f"{path}: sha256 {sha!r} is not 64 hex digits")
    return sha


def _write_pin(directory: Path, url: str, file: str, sha: str) -> None:
    tmp = directory / f"{PIN}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"url": url, "file": file, "sha256": sha}, indent=2) + "\n")
    os.replace(tmp, directory / PIN)
