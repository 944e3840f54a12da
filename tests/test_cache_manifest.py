"""The typed manifest: what stage 2 reads from a cache's field tree, and a sentence (not a KeyError) when a
manifest from elsewhere holds something else there; the typed errors of choosing a cache."""
import numpy as np
import pytest

from cache_schema import (AgentCache, AmbiguousCacheError, ArraySpec, CacheReader, CorruptCacheError, NoCacheError,
                          ViewSpec, select_cache)
from cache_schema.manifest import Manifest, SegmentEntry

ARRAYS = {"tokens": ArraySpec((2, 4, 8), "float16"), "token_mean": ArraySpec((2, 8), "float32"),
          "views": ArraySpec((5,), "int32")}
VISION_FIELDS = {
    "agent": {"name": "toy", "family": "vision", "preprocessing": {"space": "student"}, "tiny_config": {"depth": 2}},
    "dataset": {"name": "toyset", "split_hash": "abc"},
    "family": {"view_spec": ViewSpec(seed=3).to_dict(), "image_decoding": 2, "layers": [0, 1]},
}



def t2i(class_set):
    """t2i agents keep one cache per class set."""
    return {**VISION_FIELDS, "agent": {"family": "t2i"}, "family": {"class_set": class_set, "image_decoding": 2}}


def write_cache(root, fields, keys=("a.png", "b.png")):
    cache = AgentCache.open(root, "toyset", "toy", fields, ARRAYS)
    plan = cache.plan([(key, 0) for key in keys])
    cache.create_segments()
    for name, local_rows in plan[0]:
        with cache.segment_writer(name) as writer:
            writer.write(local_rows, {name: np.zeros((len(local_rows), *spec.row_shape), spec.numpy_dtype)
                                      for name, spec in ARRAYS.items()})
    cache.set_provenance("skipped_keys", ["c.png"])
    cache.set_provenance("agent_layers", {"depth": 2, "stored": [0, 1]})
    cache.finalize()
    return cache.path


def test_accessors_read_what_stage_1_wrote(tmp_path):
    manifest = CacheReader(write_cache(tmp_path, VISION_FIELDS)).manifest
    assert isinstance(manifest, Manifest) and manifest.is_complete
    assert (manifest.dataset, manifest.agent, manifest.rows) == ("toyset", "toy", 2)
    assert manifest.segments == (SegmentEntry("seg-00000", 2),)
    assert manifest.arrays == ARRAYS
    assert manifest.family == "vision" and manifest.embedding_space == "student"
    assert manifest.tiny_config == {"depth": 2}
    assert manifest.dataset_fields == {"name": "toyset", "split_hash": "abc"}
    assert manifest.view_spec == ViewSpec(seed=3)
    assert manifest.image_decoding == 2 and manifest.stored_layers == [0, 1] and manifest.token_layers == 2
    assert manifest.agent_layers == {"depth": 2, "stored": [0, 1]}
    assert manifest.skipped_keys == ("c.png",)
    assert manifest.classnames is None and manifest.class_set is None   # not a language or multimodal cache


def test_entries_absent_from_older_caches_have_their_defaults(tmp_path):
    fields = {"agent": {"family": "language"}, "dataset": {"name": "toyset"},
              "family": {"classnames": ["cat", "dog"]}}
    manifest = CacheReader(write_cache(tmp_path, fields)).manifest
    assert manifest.classnames == ["cat", "dog"]
    assert (manifest.embedding_space, manifest.tiny_config, manifest.image_decoding, manifest.stored_layers) == \
        (None, None, None, None)


@pytest.mark.parametrize("agent, entry", [
    ("toy", "fields.agent is a string"),
    ({"name": "toy"}, "fields.agent.family is missing"),
    ({"family": 7}, "fields.agent.family is an integer"),
])
def test_a_field_tree_of_another_shape_is_a_corrupt_cache_in_stage_2(tmp_path, agent, entry):
    """Before, stage 2 dug with nested keys and a manifest from another machine raised KeyError or TypeError."""
    from distill.data import open_teachers

    write_cache(tmp_path, {**VISION_FIELDS, "agent": agent})
    with pytest.raises(CorruptCacheError, match=entry):
        open_teachers(tmp_path, "toyset", "abc", ["toy"], ["a"], "all")


@pytest.mark.parametrize("family, entry", [
    ({"view_spec": {"seed": 0}}, "fields.family.view_spec is"),
    ({"view_spec": ViewSpec().to_dict(), "classnames": ["a", 1]}, "fields.family.classnames is"),
    ({"view_spec": ViewSpec().to_dict(), "image_decoding": "2"}, "fields.family.image_decoding is a string"),
])
def test_each_accessor_names_the_entry_it_cannot_use(tmp_path, family, entry):
    manifest = CacheReader(write_cache(tmp_path, {**VISION_FIELDS, "family": family})).manifest
    with pytest.raises(CorruptCacheError, match=entry):
        _ = (manifest.view_spec, manifest.classnames, manifest.image_decoding)


def test_provenance_must_be_an_object():
    data = {"schema_version": 2, "dataset": "d", "agent": "a", "fingerprint": "f", "fields": {}, "arrays": {},
            "backend": "zarr", "status": "complete", "segments": [], "rows": 0, "checksums": {}, "provenance": []}
    with pytest.raises(CorruptCacheError, match="'provenance' is a list"):
        Manifest.from_dict(data, "manifest.json")


def test_choosing_among_several_caches_skips_one_of_another_schema(tmp_path):
    """A copy written by a newer release (schema 3) beside a t2i agent's caches is not a candidate, so the run's
    class set still picks one."""
    import json
    import shutil

    from distill.data import _locate

    base, _ = write_cache(tmp_path, t2i("base")), write_cache(tmp_path, t2i("all"))
    newer = base.with_name("f" * 16)
    shutil.copytree(base, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3, "fingerprint": newer.name}))
    required = {"dataset": VISION_FIELDS["dataset"]}
    assert _locate(tmp_path, "toyset", "toy", required, None, "", "base") == base


def test_choosing_a_cache_raises_one_type_per_failure(tmp_path):
    required = {"dataset": VISION_FIELDS["dataset"]}
    with pytest.raises(NoCacheError, match="no cache for agent 'toy'"):
        select_cache(tmp_path, "toyset", "toy", required)
    paths = sorted([write_cache(tmp_path, t2i("base")), write_cache(tmp_path, t2i("all"))])
    with pytest.raises(AmbiguousCacheError) as ambiguous:
        select_cache(tmp_path, "toyset", "toy", required)
    assert ambiguous.value.agent == "toy" and ambiguous.value.fingerprints == [path.name for path in paths]


def test_stage_2_chooses_among_ambiguous_caches_by_the_error_type_not_its_text(tmp_path, monkeypatch):
    import distill.data

    base, _ = write_cache(tmp_path, t2i("base")), write_cache(tmp_path, t2i("all"))

    def reworded(*args, **kwargs):
        raise AmbiguousCacheError("two caches fit", "toy", [])

    monkeypatch.setattr(distill.data, "select_cache", reworded)
    required = {"dataset": VISION_FIELDS["dataset"]}
    assert distill.data._locate(tmp_path, "toyset", "toy", required, None, "", "base") == base
