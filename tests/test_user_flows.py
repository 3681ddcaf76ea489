"""User flows that used to lose data or answer silently wrong, each against serial torch:
a refused torch.save writes nothing, load_pretrained initialises what the checkpoint lacks as
from_pretrained does, PEFT's save_pretrained refuses before writing, out-of-range indices into
a sharded dim raise as serial, and cat with legacy empty 1-D inputs keeps them in the graph."""
import io
import os

import torch
from torch import nn

import shardtensor as st
from shardtensor.testing import run


# --- torch.save of ShardedTensors: refused before anything is written -------------------------

def _refused_saves(rank, directory):
    pg = st.ProcessGroup(tp_degree=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    st.split_row(model[0].weight, pg)
    st.split_col(model[2].weight, pg)
    kept = os.path.join(directory, f"kept{rank}.pt")
    with open(kept, "wb") as f:
        f.write(b"an earlier checkpoint")
    absent = os.path.join(directory, f"absent{rank}.pt")
    buf = io.BytesIO(b"header")
    buf.seek(6)
    errors = []
    for obj in (model.state_dict(), model, {"step": 3, "w": [model[0].weight]}):
        for dest in (kept, absent, buf):
            try:
                torch.save(obj, dest)
            except TypeError as e:
                errors.append("shardtensor.save" in str(e))
    with open(kept, "rb") as f:
        kept_bytes = f.read()
    # plain objects still save and load as before (to a path, a buffer, a non-ascii path)
    plain = {k: v.full() if isinstance(v, st.ShardedTensor) else v
             for k, v in model.state_dict().items()}
    round_trips = []
    for dest in (os.path.join(directory, f"plain{rank}.pt"), io.BytesIO(),
                 os.path.join(directory, f"pläin{rank}.pt")):
        torch.save(plain, dest)
        if isinstance(dest, io.BytesIO):
            dest.seek(0)
        back = torch.load(dest)
        round_trips.append(all(torch.equal(back[k], plain[k]) for k in plain))
    return (errors, kept_bytes, os.path.exists(absent), buf.getvalue(), buf.tell(), round_trips)


def test_refused_torch_save_leaves_the_destination_as_it_was(tmp_path):
    for errors, kept, absent_exists, buf, pos, round_trips in run(2, _refused_saves,
                                                                   str(tmp_path)):
        assert errors == [True] * 9                 # every save refused, naming shardtensor.save
        assert kept == b"an earlier checkpoint"     # the existing file is untouched
        assert not absent_exists                    # no file created
        assert (buf, pos) == (b"header", 6)         # nothing written into the buffer
        assert round_trips == [True, True, True]
