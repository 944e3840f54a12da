"""Stage 2's loader: whole batches built in workers train bit for bit as the main thread does, teacher rows are read
in the workers, and the readers travel to spawned workers as paths (never as open files or mapped arrays)."""
import os
import pickle

import pytest
import torch

from cache_schema import CacheError, CacheReader, ViewSpec
from distill.batches import EpochOrder, ReopeningReader, StudentBatches, batch_loader
from distill.config import OptimConfig, PromptConfig, StudentConfig
from distill.trainer import RunConfig, Trainer
from pipelines.bench.agents import register_tiny
from pipelines.bench.fixtures import (cache_keys, classnames, open_bank, write_student_images,
                                      write_synthetic_caches)
from pipelines.bench.plans import BENCH_DATASET, TINY

AGENTS = ("dino", "mae", "bert", "gpt3", "sd", "blip2")   # vision, relational, language and multi-modal rows
ROWS = 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    register_tiny(TINY)
    write_synthetic_caches(root / "caches", TINY, ROWS, agents=AGENTS, views=2)
    write_synthetic_caches(root / "hdf5", TINY, ROWS, agents=("dino",), backend="hdf5")
    write_student_images(root / "images", TINY, ROWS)
    return root


def trainer(root, run_dir, workers: int) -> Trainer:
    run_dir.mkdir()
    config = RunConfig(dataset=BENCH_DATASET, protocol="base2novel", shots=16, seed=1, agents=AGENTS,
                       prompts=PromptConfig(depth_vision=TINY.layers, depth_text=TINY.layers),
                       student=StudentConfig(TINY.student_model, None), optim=OptimConfig(epochs=2, batch_size=4),
                       device="cpu", workers=workers)
    return Trainer(config, cache_keys(ROWS), [i % TINY.classes for i in range(ROWS)], classnames(TINY),
                   root / "images", open_bank(root / "caches", TINY, AGENTS), run_dir, progress=False)


def test_two_workers_train_bit_identically_and_read_every_teacher_row(root, tmp_path, monkeypatch):
    main_thread = trainer(root, tmp_path / "w0", workers=0)
    main_thread.fit()
    in_workers = trainer(root, tmp_path / "w2", workers=2)
    read, parent = CacheReader.read, os.getpid()

    def read_in_a_worker(self, name, rows):
        assert os.getpid() != parent, f"the main process read {name!r} rows of {self.agent}"
        return read(self, name, rows)

    monkeypatch.setattr(CacheReader, "read", read_in_a_worker)   # the forked workers inherit the check
    in_workers.fit()
    for ours, theirs in ((main_thread.student.prompt_state_dict(), in_workers.student.prompt_state_dict()),
                         (main_thread.gates.state_dict(), in_workers.gates.state_dict())):
        assert list(ours) == list(theirs) and ours
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name
    assert (tmp_path / "w0" / "metrics.jsonl").read_text() == (tmp_path / "w2" / "metrics.jsonl").read_text()
    assert torch.equal(main_thread.state()["rng"]["torch"], in_workers.state()["rng"]["torch"])


def test_batches_pickle_their_readers_as_paths_and_reopen_the_same_cache(root):
    bank = open_bank(root / "caches", TINY, AGENTS)
    dataset = StudentBatches(root / "images", TINY.image_size, ViewSpec(), bank)
    items = [(key, key_index % 2, key_index % TINY.classes) for key_index, key in enumerate(cache_keys(4))]
    travelled = pickle.loads(pickle.dumps(dataset))
    ours, theirs = dataset[items], travelled[items]
    assert torch.equal(ours.pixels, theirs.pixels) and ours.items == theirs.items == items
    for group, rows in ours.rows.items():
        for agent, value in rows.items():
            assert torch.equal(value, theirs.rows[group][agent]), (group, agent)
    assert set(ours.rows["vision_tokens"]) == {"dino", "mae"} and set(ours.rows["mm_scores"]) == {"sd", "blip2"}

    hdf5 = CacheReader(open_bank(root / "hdf5", TINY, ("dino",)).paths["dino"])   # rows behind np.memmap
    assert len(pickle.dumps(ReopeningReader(hdf5))) < 2_000 < len(pickle.dumps(hdf5))
    state = ReopeningReader(hdf5).__getstate__()
    changed = ReopeningReader.__new__(ReopeningReader)
    changed.__setstate__({**state, "digest": "0" * 64})
    with pytest.raises(CacheError, match="changed after this run opened it"):
        changed.read("tokens", [(cache_keys(1)[0], 0)])


def test_epoch_order_and_loader_settings(root):
    items = [(key, 0, 0) for key in cache_keys(ROWS)]
    assert [len(batch) for batch in EpochOrder(4, items)] == [4, 4]        # a partial last batch is dropped ...
    assert [len(batch) for batch in EpochOrder(4, items[:3])] == [3]       # ... unless it is the only one
    dataset = StudentBatches(root / "images", TINY.image_size, ViewSpec(), open_bank(root / "caches", TINY, ()))
    order = EpochOrder(4, items)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert batch_loader(dataset, order, 2, cuda).pin_memory and batch_loader(dataset, order, 2, cuda).batch_size is None
    assert not batch_loader(dataset, order, 0, cuda).pin_memory and not batch_loader(dataset, order, 2, cpu).pin_memory
