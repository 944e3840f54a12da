"""The cache library says what is wrong and names no command; the command line adds the command that fixes it."""
import re
from pathlib import Path

from click.testing import CliRunner

import cache_schema
from cache_schema import (AgentCache, AmbiguousCacheError, ArraySpec, BackendMismatch, ChecksumMismatch,
                          DivergedCacheError, NoCacheError, NoSpaceError, PartialCacheError)
from cache_schema.lock import WriterLocked
from pipelines.cache_hints import explained, hint
from pipelines.cli import main

ARRAYS = {"views": ArraySpec((5,), "int32")}
FIELDS = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}


def test_the_cache_library_names_no_command():
    sources = sorted(Path(cache_schema.__file__).parent.glob("*.py"))
    named = [f"{source.name}:{number}" for source in sources
             for number, line in enumerate(source.read_text().splitlines(), 1)
             if re.search(r"transagent|--[a-z]", line) and not line.lstrip().startswith("#")]
    assert named == []


def test_each_error_gets_the_command_that_fixes_it():
    assert hint(AmbiguousCacheError("two match", "dino", ["a", "b"])) == \
        "pin one with --cache-fingerprint dino=<fingerprint>"
    assert "--backend hdf5" in hint(BackendMismatch("other backend", "hdf5"))
    assert "`transagent cache verify`" in hint(ChecksumMismatch("altered"))
    assert "`transagent cache merge`" in hint(DivergedCacheError("other rows"))
    assert "`transagent cache gc --apply`" in hint(NoSpaceError("full"))
    assert "`transagent extract`" in hint(PartialCacheError("partial"))
    assert "cache unlock --force /c" in hint(WriterLocked("held", None, Path("/c")))
    assert hint(WriterLocked("its holder still has the OS lock")) == ""   # unlocking cannot help there
    assert explained(NoCacheError("no cache here")) == "no cache here"
    assert explained(NoSpaceError("full")).startswith("full\n  `transagent cache gc")


def test_the_command_line_shows_the_hint(tmp_path):
    cache = AgentCache.open(tmp_path, "toyset", "toy", FIELDS, ARRAYS)   # partial: nothing written yet
    result = CliRunner().invoke(main, ["cache", "pack", str(cache.path), "-o", str(tmp_path / "p.tar")])
    assert result.exit_code == 1
    assert "is partial" in result.output and "the same `transagent extract` run again" in result.output
