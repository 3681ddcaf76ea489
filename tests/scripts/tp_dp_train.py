"""Run under torchrun (any number of nodes): GPT-2, tp=2 x dp=(world/2), trained for 5 steps on
a global batch split over the data-parallel replicas; compares with serial on the global batch
and prints one JSON line on rank 0."""
import copy
import json

import torch
import torch.distributed as dist

import shardtensor as st
from shardtensor.models_testing import build, inputs_for, weight_error


def main(steps: int = 5):
    st.init_distributed()
    pg = st.ProcessGroup(tp_degree=2, dp_degree=dist.get_world_size() // 2)
    serial = build("gpt2", "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    sync = st.data_parallel(model, pg)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (serial, model)]
    dp, me = pg.dp_world_size(), pg.dp_local_rank()
    curves = ([], [])
    for step in range(steps):
        batch = inputs_for("gpt2", batch=2 * dp, seed=step, padding=False)
        mine = {k: v.chunk(dp)[me] for k, v in batch.items()}
        for i, (m, opt, b) in enumerate(((serial, opts[0], batch), (model, opts[1], mine))):
            opt.zero_grad()
            loss = m(**b).loss
            loss.backward()
            opt.step()
            v = loss.full() if isinstance(loss, st.ShardedTensor) else loss.detach()
            if i == 1:  # the global loss is the mean over replicas
                v = v.clone()
                dist.all_reduce(v, group=pg.dp_process_group())
                v /= dp
            curves[i].append(float(v))
    worst = weight_error(model, serial)
    sync.remove()
    return dict(serial=curves[0], parallel=curves[1], worst=worst, world=dist.get_world_size())


if __name__ == "__main__":
    out = main()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()              # every rank done before any tears its groups down
    dist.destroy_process_group()
