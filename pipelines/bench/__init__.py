"""Performance benchmarks (DESIGN §8): `transagent bench` writes bench/results.json and prints a short table.

At ViT-B/16 shapes with random weights (224 px, 196 tokens, 12 layers, 768 dims, 4 vision agents, 10 classes,
batch 4), on the CPU and on the GPU when one is present:

1. stage-2 overhead: the training step reading every cache / the student-only step (CE, no cache);
2. cache vs live teachers: the step with the four vision agents run on each batch / the cached step, as the
   official code runs them (autograd on, weights requiring grad; reference §3.1) and under no_grad;
3. extraction: `extract` throughput of one vision agent / its bare forward on the same batches, and the wall
   time of a repeated `extract` over a complete cache (a fresh process, as a user runs it);
4. cache reads: a random batch from the stage-2 reader / np.memmap of the same rows in one .npy file;
5. scaling: extraction time and cache size for 100 / 1,000 / 10,000 rows of a tiny agent.

Everything runs the real code: `distill.trainer.Trainer.step` over a TeacherBank from `open_teachers`, reading
caches written by `cache_schema.AgentCache` (synthetic rows of the real shapes: random unit tokens in fp16, so no
agent has to run), and the extract runner (`extract.runner.run_agent`) for items 3 and 5.

Method. Times are medians over repetitions after warm-up. A comparison is the median of per-round ratios with
the variants interleaved in one process (A B, B A, A B, ...), so a machine that slows down slows both sides of
the ratio. The memory of a variant is the peak of a fresh process that runs only that variant
(`pipelines.bench_workers`): anonymous RSS on CPU (sampled; memory-mapped cache pages belong to the page cache,
not to the process), torch.cuda.max_memory_allocated on GPU.
"""
