"""The MMBench2 data plane: raw layout, frame shards, training windows, sampling and the Hub.

- ``raw``: ``<task>.pt`` + ``<task>-<i>.png`` strips (read and write, resumable).
- ``shards``: preprocessed ``.pt`` / ``.chunks`` frame shards with a completion index.
- ``windows``: ``TokenizerWindows`` and ``DynamicsWindows`` torch Datasets.
- ``sampling``: task weighting (valid_starts, uniform = coverage-aware, targeted) and samplers.
- ``hub``: ``download_dataset`` from ``nicklashansen/mmbench2``.
"""
from mmbench2_lab.data.raw import FRAMES_PER_STRIP, RawTask, RawWriter, StripFrames, list_raw_tasks, read_raw
from mmbench2_lab.data.shards import (ChunkedShard, CorruptShardError, ShardFrames, list_shards, load_shard,
                                      preprocess, preprocess_task, read_index, write_shard)
from mmbench2_lab.data.windows import (Block, DynamicsWindows, TokenizerWindows, held_out_episodes, open_frames,
                                       valid_starts)
from mmbench2_lab.data.sampling import BlockSampler, make_sampler, rank_partition, task_weights
from mmbench2_lab.data.hub import download_dataset

__all__ = [
    "FRAMES_PER_STRIP", "RawTask", "RawWriter", "StripFrames", "list_raw_tasks", "read_raw",
    "ChunkedShard", "CorruptShardError", "ShardFrames", "list_shards", "load_shard", "preprocess",
    "preprocess_task", "read_index", "write_shard",
    "Block", "DynamicsWindows", "TokenizerWindows", "held_out_episodes", "open_frames", "valid_starts",
    "BlockSampler", "make_sampler", "rank_partition", "task_weights", "download_dataset",
]
