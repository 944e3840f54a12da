"""Performance benchmarks (DESIGN §8): `transagent bench` writes bench/results.json and prints a one-screen table.

At ViT-B/16 shapes with random weights (224 px, 196 tokens, 12 layers, 768 dims, 4 vision agents, 10 classes,
batch 4), on the CPU; `--device cuda` runs the GPU section (`gpu`) instead:

1. stage 2 (`loader`, `stage2`): short epochs of the trainer's own loop with every cache against student-only,
   the teacher rows read in the main thread or by two loader workers (time, and the main thread's wait for a
   batch), and the peak memory of each variant;
2. cache vs live teachers (`stage2`): the step with the four vision agents run on each batch / the cached step,
   as the official code runs them (autograd on, weights requiring grad; reference §3.1) and under no_grad;
3. extraction (`extraction`): `extract` throughput of one vision agent / its bare forward on the same batches,
   and the wall time of a repeated `extract` over a complete cache (a fresh process, as a user runs it);
4. cache reads (`reads`): random batches from the stage-2 reader / np.memmap of the same rows in one .npy file,
   over a cache with as many row files as a real one;
5. scaling (`scaling`): extraction time and cache size for 100 / 1,000 / 10,000 rows of a tiny agent.

Everything runs the real code: `distill.trainer.Trainer` over a TeacherBank from `open_teachers`, reading caches
written by `cache_schema.AgentCache` (synthetic rows of the real shapes, `fixtures`, so no agent has to run), and
the extract runner (`extract.runner.run_agent`) for items 3 and 5. `run.SECTIONS` lists the sections in order.

Method (`harness`). A comparison runs its variants in alternating rounds in one process (A B, B A, ...) and is
the median of the per-round ratios over at least five rounds, printed with their range: a target inside the
range is "within noise" (`report`). The memory of a variant is the peak of each step in a fresh process that
runs only that variant (`pipelines.bench_workers`): anonymous RSS on CPU (sampled; memory-mapped cache pages
belong to the page cache, not to the process), torch.cuda.max_memory_allocated on GPU.
"""
