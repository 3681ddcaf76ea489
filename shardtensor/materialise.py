"""Filling a model whose tensors may be on the meta device, for `load` and `load_pretrained`.

A meta tensor is materialised in place (`swap_tensors`: the same Python object, so tied names
stay tied and an optimizer built before still holds it). Meta buffers outside the loaded state
(non-persistent ones such as rotary `inv_freq`) are computed before anything changes
(`computed_buffers`), as serial construction computes them: a HuggingFace model's from a copy
built with its parameters on the meta device (transformers 4.x computes them only in
`__init__`), any other model's by its `_init_weights`; then installed (`install_buffers`).
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn

from .checkpoint_io import CheckpointError
from .tensor import ShardedTensor, wrap

__all__ = ["fill", "computed_buffers", "install_buffers", "can_init", "init_missing"]

Computed = List[Tuple[str, nn.Module, str, torch.Tensor]]


def fill(t: torch.Tensor, buf: torch.Tensor) -> None:
    """Put `buf` (this rank's local piece) into `t`: in place, or by materialising a meta `t`
    in place (the same Python object, so tied names stay tied)."""
    if not t.is_meta:
        (t._local if isinstance(t, ShardedTensor) else t).copy_(buf)
        return
    requires_grad = t.requires_grad
    new = wrap(buf, t._spec, t._pg, t._gshape, t._compute_spec) if isinstance(t, ShardedTensor) else buf
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=requires_grad)
    elif isinstance(new, ShardedTensor):
        new._local.requires_grad_(requires_grad)
    torch.utils.swap_tensors(t, new)


def computed_buffers(model: nn.Module, filled: Iterable[int], where: str) -> Computed:
    """(name, module, buffer name, CPU value) for each meta buffer loading leaves unfilled (not
    among the tensors with ids `filled`), computed without changing `model`. Raises
    CheckpointError (prefixed `where`) naming those nothing computes, before anything changed."""
    skip = set(filled)
    todo = [(f"{m}.{b}" if m else b, mod, b) for m, mod in model.named_modules()
            for b, v in mod._buffers.items() if v is not None and v.is_meta and id(v) not in skip]
    if not todo:
        return []
    values, why = _from_hf_rebuild(model, todo)
    rest = [t for t in todo if t[0] not in values]
    if rest:
        if getattr(model, "_init_weights", None) is None:
            why.append("the model has no _init_weights")
        else:
            values.update(_from_init_weights(model, rest))
            why.append("its _init_weights leaves them")
    bad = [n for n, _, _ in todo if n not in values]
    if bad:
        raise CheckpointError(
            f"{where}buffers {bad} are on the meta device and not in the checkpoint, and "
            f"nothing computes them ({'; '.join(why)}); build the model with buffers off the "
            f"meta device")
    return [(n, mod, b, values[n]) for n, mod, b in todo]


def install_buffers(computed: Computed) -> List[str]:
    """Put the values `computed_buffers` returned into their modules; their names."""
    for _, mod, b, v in computed:
        mod._buffers[b] = v
    return [n for n, _, _, _ in computed]


# --- a HuggingFace model: its buffers as its own construction computes them ---------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get each parameter moved to the meta device as it is registered,
    their buffers stay real (accelerate's `init_empty_weights(include_buffers=False)`, which
    transformers 4.x's own meta loading uses). Patches nn.Module for the duration."""
    register = nn.Module.register_parameter

    def on_meta(mod, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(mod, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _hf_roots(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The outermost HuggingFace PreTrainedModels in `model` (itself, or PEFT's base model)."""
    hf = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    if hf is None:
        return []
    roots: List[Tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, hf) and not any(name == p or name.startswith(p + ".") if p else True
                                           for p, _ in roots):
            roots.append((name, mod))
    return roots


def _from_hf_rebuild(model: nn.Module, todo) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Values of the `todo` buffers inside HF models, read from a copy of each built from its
    config with parameters on the meta device (the global RNG is left as it was); and, for
    those it cannot give, why."""
    values: Dict[str, torch.Tensor] = {}
    why: List[str] = []
    metas = {n: mod._buffers[b] for n, mod, b in todo}
    for prefix, root in _hf_roots(model):
        mine = [(n, n[len(prefix) + 1:] if prefix else n) for n in metas
                if not prefix or n.startswith(prefix + ".")]
        if not mine:
            continue
        built = f"{type(root).__name__}(config)"
        try:
            with torch.random.fork_rng(devices=[]), _parameters_on_meta(), torch.device("cpu"):
                fresh = type(root)(copy.deepcopy(root.config))
        except Exception as e:   # an unusual constructor: the error names the buffers
            why.append(f"building {built} failed: {type(e).__name__}: {e}")
            continue
        for name, rel in mine:
            v = _buffer(fresh, rel)
            if v is not None and not v.is_meta and v.shape == metas[name].shape:
                values[name] = v.detach().to(metas[name].dtype)
        if any(n not in values for n, _ in mine):
            why.append(f"{built} has no such buffers of those shapes")
    if not why and len(values) < len(metas):
        why.append("not a HuggingFace model, whose construction would compute them")
    return values, why


def _buffer(mod: nn.Module, name: str):
    owner, _, b = name.rpartition(".")
    try:
        sub = mod.get_submodule(owner) if owner else mod
    except AttributeError:
        return None
    return sub._buffers.get(b)


# --- any other model: its _init_weights -----------------------------------------------------------

def _sentinel(t: torch.Tensor) -> torch.Tensor:
    """`t`'s shape and dtype, filled with a value no init writes: NaN, the integer minimum, and
    for bool the byte 2 (torch writes only 0 and 1)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.full(t.shape, float("nan"), dtype=t.dtype)
    out = torch.zeros(t.shape, dtype=t.dtype)
    if t.dtype == torch.bool:
        out.view(torch.uint8).fill_(2)
    else:
        out.fill_(torch.iinfo(t.dtype).min)
    return out


def _unfilled(t: torch.Tensor) -> bool:
    if t.is_meta:
        return True
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return bool(torch.isnan(t).any())
    if t.dtype == torch.bool:
        return bool((t.view(torch.uint8) == 2).any())
    return bool((t == torch.iinfo(t.dtype).min).any())


def _from_init_weights(model: nn.Module, todo) -> Dict[str, torch.Tensor]:
    """Values of the `todo` buffers as `model._init_weights` writes them into placeholders
    (every parameter marked initialised, so HF-style init functions leave them alone); the
    meta buffers are put back, so the model is unchanged."""
    saved = [(mod, b, mod._buffers[b]) for _, mod, b in todo]
    flagged = [p for p in model.parameters() if not getattr(p, "_is_hf_initialized", False)]
    values = {}
    try:
        for _, mod, b in todo:
            mod._buffers[b] = _sentinel(mod._buffers[b])
        for p in flagged:
            p._is_hf_initialized = True
        with torch.no_grad():
            for mod in {id(m): m for _, m, _ in todo}.values():
                model._init_weights(mod)
        for name, mod, b in todo:
            if not _unfilled(mod._buffers[b]):
                values[name] = mod._buffers[b]
    finally:
        for p in flagged:
            del p._is_hf_initialized
        for mod, b, v in saved:
            mod._buffers[b] = v
    return values


# --- parameters a checkpoint lacks: initialised as HuggingFace's from_pretrained does ------------

def hf_init_rules() -> None:
    """transformers' `initialize_weights` swaps `torch.nn.init`'s functions for its own
    flag-checking ones while it runs (`guard_torch_init_functions`), so torch's `normal_` hands
    `__torch_function__` transformers' `normal_`: give those the rules of torch's own (once,
    where transformers.initialization is imported)."""
    from .dispatch import RULES
    mod = sys.modules.get("transformers.initialization")
    originals = getattr(mod, "TORCH_INIT_FUNCTIONS", {})
    for name, torch_fn in originals.items():
        theirs = getattr(mod, name, None)
        if torch_fn in RULES and theirs is not None and theirs not in RULES:
            RULES[theirs] = RULES[torch_fn]


def _init_roots(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules whose `_init_weights` initialise: the model if it has one, else the HF
    models inside it (PEFT's base model)."""
    if getattr(model, "_init_weights", None) is not None:
        return [("", model)]
    return _hf_roots(model)


def can_init(model: nn.Module, names: Iterable[str]) -> bool:
    """Whether `init_missing` can initialise the parameters `names` of `model`: each is inside a
    module with an HF-style `_init_weights`."""
    roots = [p for p, _ in _init_roots(model)]
    return all(any(not p or n.startswith(p + ".") for p in roots) for n in names)


def init_missing(model: nn.Module, missing: List[torch.Tensor], loaded: List[torch.Tensor]) -> None:
    """Initialise the parameters `missing` (materialised on the CPU first if on the meta device)
    as `from_pretrained` initialises what a checkpoint lacks: the `loaded` tensors and every
    buffer are flagged `_is_hf_initialized`, so are the modules holding no missing parameter,
    and the model's own `initialize_weights` (`_init_weights` per module) runs: transformers 5's
    init functions skip flagged tensors, 4.x skips flagged modules. The same random draws as
    serial under the same seed (an in-place random fill of a ShardedTensor draws the whole
    tensor). The flags stay, as from_pretrained leaves them."""
    from .checkpoint import Target
    for t in missing:
        if t.is_meta:
            fill(t, torch.empty(Target("", t).local_shape(), dtype=t.dtype))
    for t in loaded:
        t._is_hf_initialized = True
    for b in model.buffers():
        b._is_hf_initialized = True
    ids = {id(t) for t in missing}
    for mod in model.modules():   # (a module built off the meta device was flagged at init)
        mod._is_hf_initialized = not any(id(p) in ids for p in mod.parameters())
    hf_init_rules()
    for _, root in _init_roots(model):
        if getattr(root, "initialize_weights", None) is not None:
            root.initialize_weights()
        elif getattr(root, "_initialize_weights", None) is not None:
            root.apply(root._initialize_weights)
        else:
            root.apply(root._init_weights)
    for t in missing:
        t._is_hf_initialized = True
