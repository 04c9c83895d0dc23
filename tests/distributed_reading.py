"""The usual multi-process reading loops over one cache, and README's resume through accelerate, in one launch:

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/distributed_reading.py CACHE OUT.json

Each loop's per-rank sample ids are gathered with `all_gather_object`; rank 0 writes them, with
the process count accelerate saw, to OUT.json for tests/test_distributed.py to check.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, DistributedSampler

from builder.reader import collate_nemo, load_cache

BATCH = 3


def main(cache: str, out: str) -> None:
    accelerator = Accelerator()  # MULTI_CPU under torchrun with ACCELERATE_USE_CPU=1: a gloo group
    results = {"num_processes": accelerator.num_processes, "world_size": dist.get_world_size()}
    with accelerator.main_process_first():  # map-style: the Arrow cache is prepared once
        load_cache(cache, layout="raw", columns=["sample_id"], streaming=False)
    every = [row["sample_id"] for row in raw(cache)]  # not split: every rank sees the whole cache
    results["every"] = gather(every)
    number = {sample_id: i for i, sample_id in enumerate(every)}

    def collate(rows):  # accelerate dispatches tensors only: sample ids travel as their index
        return torch.tensor([number[row["sample_id"]] for row in rows])

    def ids(loader) -> list[str]:
        return [every[i] for batch in loader for i in batch.tolist()]

    # (a) load_cache -> DataLoader -> accelerator.prepare: streaming (dispatched by rank 0 by default,
    # or read by every rank and sliced by accelerate) and map-style (batch sampler sharded).
    results["accelerate_streaming"] = gather(ids(accelerator.prepare(DataLoader(raw(cache), batch_size=BATCH, collate_fn=collate))))
    per_rank = Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    results["accelerate_streaming_not_dispatched"] = gather(
        ids(per_rank.prepare(DataLoader(raw(cache), batch_size=BATCH, collate_fn=collate)))
    )
    # README recipe 1: as above, with DataLoader workers. Each worker reads whole shards and so ends on a
    # short batch mid-epoch; read by every rank, accelerate completes it (dispatched, it would drop rows).
    results["accelerate_streaming_workers"] = gather(
        ids(per_rank.prepare(DataLoader(raw(cache), batch_size=BATCH, collate_fn=collate, num_workers=2)))
    )
    results["accelerate_map"] = gather(
        ids(accelerator.prepare(DataLoader(raw(cache, streaming=False), batch_size=BATCH, collate_fn=collate)))
    )
    # README recipe 1 with accelerate's default dispatch: NeMo layout, fixed-length batches so rank 0 can dispatch them.
    nemo = accelerator.prepare(
        DataLoader(load_cache(cache, layout="nemo"), batch_size=BATCH, collate_fn=functools.partial(collate_nemo, pad_to=128))
    )
    results["accelerate_nemo_rows"] = gather(sum(batch["input_ids"].shape[0] for batch in nemo))

    # (b) torchrun + DistributedSampler over a map-style cache
    dataset = raw(cache, streaming=False)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    sampler.set_epoch(0)
    results["distributed_sampler"] = gather(ids(DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collate)))

    # (c) streaming without accelerate: each rank asks for its part, DataLoader workers split it further
    results["split_by_rank"] = gather(ids(DataLoader(raw(cache, split_by_rank=True), batch_size=BATCH, collate_fn=collate)))
    results["split_by_rank_workers"] = gather(
        ids(DataLoader(raw(cache, split_by_rank=True), batch_size=BATCH, collate_fn=collate, num_workers=2))
    )

    # Mid-epoch resume, per rank: k samples, then a fresh dataset loaded with the state reads on.
    resumed = {}
    for shuffle_buffer in (None, 3):

        def open_part(shuffle_buffer=shuffle_buffer):
            return raw(cache, split_by_rank=True, shuffle_buffer=shuffle_buffer, seed=5)

        whole = [row["sample_id"] for row in open_part()]
        for k in (1, len(whole) // 2, len(whole) - 1, len(whole)):
            first = open_part()
            head = [row["sample_id"] for row in itertools.islice(first, k)]
            second = open_part()
            second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint stores it
            tail = [row["sample_id"] for row in second]
            resumed[f"{shuffle_buffer}/{k}"] = {"whole": whole, "head": head, "tail": tail}
    results["resume"] = gather(resumed)
    results["accelerate_resume"] = gather(accelerate_resume(cache, collate, ids))

    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(results, f)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def accelerate_resume(cache: str, collate, ids) -> dict:
    """README's resume through accelerate, with a shuffle buffer (so each epoch has its own order).
    A restart is a new dataset and prepared loader (accelerate's epoch counter back at 0) loaded with
    the state a training step saved."""
    stateful = Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True, dispatch_batches=False))

    def open_loader():
        dataset = raw(cache, shuffle_buffer=3, seed=5)
        return dataset, stateful.prepare(DataLoader(dataset, batch_size=BATCH, collate_fn=collate))

    def checkpoint_at(step: int, e: int) -> tuple[list[str], dict, bool]:
        """What a run reads up to `step` of epoch `e`, the loader state saved at that step, and
        whether the step was the epoch's last (`end_of_dataloader`)."""
        _, loader = open_loader()
        for before in range(e):
            loader.set_epoch(before)
            ids(loader)
        loader.set_epoch(e)
        head = []
        for i, batch in enumerate(loader):
            head += ids([batch])
            if i == step:
                return head, copy.deepcopy(loader.state_dict()), loader.end_of_dataloader
        raise AssertionError(f"epoch {e} has no step {step}")

    def restart(state: dict, set_epoch) -> object:
        dataset, loader = open_loader()
        loader.load_state_dict(state)
        set_epoch(dataset, loader)
        return loader

    _, uninterrupted = open_loader()
    whole, last_step = [], []
    for e in range(3):
        uninterrupted.set_epoch(e)
        whole.append([])
        for batch in uninterrupted:
            whole[e] += ids([batch])
            last_step.append(uninterrupted.end_of_dataloader)
    run = {"whole": whole, "end_of_dataloader": last_step[: len(whole[0]) // BATCH]}
    # Mid-epoch 1: the loop sets the epoch on the prepared loader (README), or on the dataset only.
    run["head"], state, _ = checkpoint_at(1, 1)
    resumed = restart(state, lambda dataset, loader: loader.set_epoch(1))
    run["tail"] = ids(resumed)
    resumed.set_epoch(2)
    run["next_epoch"] = ids(resumed)
    run["tail_dataset_set_epoch"] = ids(restart(state, lambda dataset, loader: dataset.set_epoch(1)))
    # At epoch 0's last step accelerate saves "epoch over": the restart starts epoch 1 (README).
    _, state, last = checkpoint_at(len(whole[0]) // BATCH - 1, 0)
    run["after_last_step"] = ids(restart(state, lambda dataset, loader: loader.set_epoch(0 + last)))
    run["after_last_step_same_epoch"] = ids(restart(state, lambda dataset, loader: loader.set_epoch(0)))
    return run


def raw(cache: str, **kwargs):
    return load_cache(cache, layout="raw", columns=["sample_id"], **kwargs)


def gather(value) -> list:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


if __name__ == "__main__":
    main(*sys.argv[1:3])
