"""Where shardtensor's overhead goes: torch.profiler over a parallelized HF GPT-2 training step
(CPU, world 1). python benchmarks/profile_step.py"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shardtensor as st  # noqa: E402
from shardtensor.launch import free_port  # noqa: E402
from shardtensor.models_testing import build, inputs_for  # noqa: E402


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    pg = st.ProcessGroup()
    serial = build("gpt2", "sdpa", layers=2, vocab=1001)
    model = st.parallelize(copy.deepcopy(serial), pg)
    batch = inputs_for("gpt2", batch=4, seq=32, vocab=1001)
    for name, m in (("serial", serial), ("shardtensor", model)):
        for _ in range(3):
            m(**batch).loss.backward()
        with profile(activities=[ProfilerActivity.CPU], with_stack=False) as prof:
            for _ in range(5):
                m(**batch).loss.backward()
        print(f"\n== {name}: 5 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
