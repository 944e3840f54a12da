"""Content addresses for caches: a hash of everything that changes the numbers, and a diff that names fields."""
from __future__ import annotations

import hashlib
import json

FINGERPRINT_LENGTH = 16


def canonical_json(data) -> str:
    """One spelling per value: sorted keys, no whitespace, tuples as lists. Floats keep Python's repr."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def differing_fields(expected, actual, prefix: str = "") -> list[str]:
    """Dotted paths where two field trees differ (leaves only), e.g. ['dataset.split_hash']."""
    expected = json.loads(canonical_json(expected))
    actual = json.loads(canonical_json(actual))
    return _diff(expected, actual, prefix)


def _diff(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(path)
            else:
                out.extend(_diff(a[key], b[key], path))
        return out
    return [] if a == b else [prefix or "<root>"]


def sha256_file(path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
