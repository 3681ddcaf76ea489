"""CUDA-graph capturability, checked on CPU: a parallelized model's training step and decode
step ask the host for no tensor value (`bool()`, `.item()`, `.tolist()`, `int()`...) that the
serial model does not ask for too. Such a read is a device sync on GPU and breaks
`torch.cuda.graph` capture; the serial model's step captures, so the sharded one must too."""
import copy

import pytest
import torch

import shardtensor as st
from shardtensor.models_testing import build, inputs_for
from shardtensor.testing import run

_HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")


class HostReads:
    """Records every host read of a tensor value made anywhere while active (HF code, rules,
    collectives), by patching the Tensor methods themselves: a TorchFunctionMode would not see
    the reads a rule makes inside its own dispatch."""

    def __enter__(self):
        self.calls, self._saved = [], {}
        for name in _HOST_READS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def patched(t, *a, _orig=orig, _name=name, **k):
                self.calls.append(_name)
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, patched)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return False


def _train_and_decode(rank, arch, decode=True):
    from transformers import StaticCache
    pg = st.ProcessGroup()
    serial = build(arch, "sdpa")
    model = copy.deepcopy(serial)
    st.parallelize(model, pg)
    batch = inputs_for(arch)
    ids = batch["input_ids"]
    out = {}
    for name, m in (("serial", serial), ("sharded", model)):
        m(**batch).loss.backward()                       # first call: lazy setup off the record
        with HostReads() as rec:
            m(**batch).loss.backward()
        train = sorted(rec.calls)
        if not decode:
            out[name] = (train, None)
            continue
        with torch.no_grad():
            cache = StaticCache(config=m.config, max_cache_len=ids.shape[1] + 4)
            m(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]))
            step = dict(input_ids=ids[:, -1:], past_key_values=cache,
                        cache_position=torch.tensor([ids.shape[1]]))
            with HostReads() as rec:
                logits = m(**step).logits
                torch.argmax(logits[:, -1], -1)
        out[name] = (train, sorted(rec.calls))
    return out


# transformers' mask for torch < 2.5 (sdpa_mask_older_torch) does `causal_mask |= ...` on an
# expanded tensor: a StaticCache step at batch 2 without an attention mask fails serially there
OLD_TORCH_MASK = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sharded_steps_read_no_more_host_values_than_serial(arch):
    for r in run(2, _train_and_decode, arch, not OLD_TORCH_MASK):
        assert r["sharded"][0] == r["serial"][0], f"training step: {r}"
        assert r["sharded"][1] == r["serial"][1], f"decode step: {r}"
