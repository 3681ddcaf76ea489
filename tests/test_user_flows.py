"""User flows that used to lose data or answer silently wrong, each against serial torch:
a refused torch.save writes nothing, load_pretrained initialises what the checkpoint lacks as
from_pretrained does, PEFT's save_pretrained refuses before writing, out-of-range indices into
a sharded dim raise as serial, and cat with legacy empty 1-D inputs keeps them in the graph."""
import io
import os

import pytest
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


# --- PEFT's save_pretrained: refused before anything is written ---------------------------------

def _peft_saves(rank, directory):
    import peft
    from shardtensor.models_testing import build, inputs_for
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                          init_lora_weights=False)
    torch.manual_seed(5)
    serial = peft.get_peft_model(build("gpt2"), cfg)
    model = peft.get_peft_model(build("gpt2"), cfg)
    model.load_state_dict(serial.state_dict())
    st.parallelize(model, st.ProcessGroup(tp_degree=2))
    refused = os.path.join(directory, f"refused{rank}")
    try:
        model.save_pretrained(refused)
        message = ""
    except st.UnsupportedOpError as e:
        message = str(e)
    # the recipe the error names saves the adapters, which load serially
    recipe = os.path.join(directory, "recipe")
    model.save_pretrained(recipe, state_dict=st.full_state_dict(model),
                          is_main_process=(rank == 0))
    torch.distributed.barrier()
    back = peft.PeftModel.from_pretrained(build("gpt2"), recipe)
    batch = inputs_for("gpt2")
    same = torch.equal(back(**batch).logits, serial(**batch).logits)
    # a plain (unparallelized) PEFT model still saves without the recipe
    plain = os.path.join(directory, f"plain{rank}")
    serial.save_pretrained(plain)
    return (message, os.path.exists(refused), same,
            sorted(os.listdir(plain)) == ["README.md", "adapter_config.json",
                                          "adapter_model.safetensors"])


def test_peft_save_pretrained_refuses_before_writing(tmp_path):
    pytest.importorskip("peft")
    for message, written, same, plain_saved in run(2, _peft_saves, str(tmp_path)):
        assert "PeftModel.save_pretrained" in message and "lora_" in message, message
        assert "full_state_dict" in message and "Nothing was written" in message
        assert not written          # no README.md, no directory
        assert same and plain_saved
