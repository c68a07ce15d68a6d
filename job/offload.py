"""Group offloading that holds up in training: a small adaptation layer over diffusers' group offloading and
optimum-quanto. No fork, no patched library function; each fix is pinned by a test in tests/test_offload.py.

diffusers' group offloading (diffusers/hooks/group_offloading.py) is built for inference. In training:

1. Stock (non-reentrant) gradient checkpointing stops a block's recompute early, so the block's post-forward,
   which offloads it, never runs in the backward: every group stays loaded. Here a gradient hook on each
   block's hidden-state inputs offloads the block's groups once its backward is done; block 0 gets an input
   that requires grad (a detached copy of its hidden states) so its hook fires too. And a group of several
   blocks is onloaded by its first block, but the backward recomputes its last block first (in disk mode it
   would compute with placeholders): there the group is onloaded by that block.
2. Without checkpointing, autograd keeps every block's weights alive until the backward, so offloading saves
   nothing: `model.py` turns checkpointing on with offloading, and says so.
3. With a CUDA stream, the prefetch chain is recorded in the first forward; the backward recomputes blocks in
   reverse, so each would prefetch the block already finished. During the backward the chain is reversed,
   and `record_stream` keeps a side-stream load from reusing memory that backward kernels still read.
4. optimum-quanto weights are tensor subclasses: `param.data = x` moves the wrapper but leaves the int8
   payload and scale inside it behind, `Module._apply` must swap them (refused once autograd saved them) and
   safetensors cannot write them. `expose_quantized_payload` gives each frozen quantised module its payload
   as plain frozen parameters and rebuilds the quanto weight from detached aliases of them on each access.
5. Disk offloading reuses any file already in its folder, even one written for another model: every run gets
   a fresh folder under GROUP_OFFLOAD_TO_DISK_PATH, named after the model's fingerprint, removed at exit.
6. At leaf level the offload hooks must wrap LyCORIS's forward, not be wrapped by it (LyCORIS reads the base
   weight after an inner hook has released it): `apply` takes the applied adapter, so it comes second.

Imports torch and (lazily) diffusers and optimum-quanto; knows nothing of settings or datasets.
"""
from __future__ import annotations

import atexit
import ctypes
import fcntl
import functools
import inspect
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("job")

GROUP_HOOK = "group_offloading"  # the name diffusers registers its group offloading hook under
FOLDER_PREFIX = "offload-"


@dataclass(frozen=True)
class Policy:
    """How the transformer's weights are offloaded (the ENABLE_GROUP_OFFLOAD settings, resolved)."""

    kind: str = "block_level"  # or "leaf_level"
    blocks_per_group: int = 1
    use_stream: bool = False
    disk_root: str = ""  # "": offload to CPU memory


# ---------------------------------------------------------------- quanto weights as plain parameters

def _flatten(t: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """(how to rebuild `t`, its plain tensors): a tensor subclass's inner tensors, recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return None, [t]
    names, ctx = t.__tensor_flatten__()
    specs, leaves = [], []
    for name in names:
        spec, inner = _flatten(getattr(t, name))
        specs.append((name, spec, len(inner)))
        leaves += inner
    return (type(t), ctx, specs, t.size(), t.stride()), leaves


def _unflatten(spec, leaves: list[torch.Tensor]) -> torch.Tensor:
    if spec is None:
        return leaves[0]
    cls, ctx, specs, size, stride = spec
    inner, i = {}, 0
    for name, s, n in specs:
        inner[name] = _unflatten(s, leaves[i:i + n])
        i += n
    return cls.__tensor_unflatten__(inner, ctx, size, stride)


def _payload_weight(self):
    """A frozen quanto module's `weight`, rebuilt on each access from plain frozen parameters. Detached aliases:
    what autograd saves keeps the storage it used, however the parameters move afterwards."""
    return _unflatten(self._payload_spec, [self._parameters[n].detach() for n in self._payload_names])


@functools.cache
def _payload_class(cls: type) -> type:
    # A subclass of the quanto class: quanto's kernels and LyCORIS's quantised-layer bypass apply as before.
    return type(f"Payload{cls.__name__}", (cls,), {"weight": property(_payload_weight), "__module__": __name__})


def expose_quantized_payload(model: torch.nn.Module) -> int:
    """After quantize + freeze: each frozen quanto weight becomes plain frozen parameters (payload, scale, ...).
    The module keeps its class's behaviour and its state_dict keys. Returns how many modules changed."""
    from optimum.quanto import QTensor
    from optimum.quanto.nn import QModuleMixin

    n = 0
    for module in model.modules():
        w = module._parameters.get("weight")
        if not (isinstance(module, QModuleMixin) and isinstance(w, QTensor)):
            continue
        spec, leaves = _flatten(w.data if isinstance(w, torch.nn.Parameter) else w)
        names = [f"weight_payload_{i}" for i in range(len(leaves))]
        del module._parameters["weight"]
        for name, leaf in zip(names, leaves):
            module.register_parameter(name, torch.nn.Parameter(leaf, requires_grad=False))
        module._payload_spec, module._payload_names = spec, names
        module.__class__ = _payload_class(type(module))
        n += 1
    return n


# ---------------------------------------------------------------- disk folder

class DiskFolder:
    """A fresh folder for one run's offloaded weights, locked while the run lives. Folders of runs that died
    (their lock is free) are removed when the next run starts under the same root."""

    def __init__(self, root: Path, fingerprint: str):
        root.mkdir(parents=True, exist_ok=True)
        self.swept = self.sweep(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{fingerprint}-", dir=root))
        self._lock = open(self.path / ".lock", "w")  # noqa: SIM115 - held open for the run's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        atexit.register(self.remove)

    @staticmethod
    def sweep(root: Path) -> list[Path]:
        gone = []
        for d in root.glob(f"{FOLDER_PREFIX}*"):
            lock = d / ".lock"
            if not lock.exists():
                if time.time() - d.stat().st_mtime < 60:  # just created by a run that is about to lock it
                    continue
            else:
                with open(lock) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live run's folder
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        return gone

    def remove(self) -> None:
        if not self._lock.closed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._lock.close()


# ---------------------------------------------------------------- training-safe group offloading

STREAMS = ("hidden_states", "encoder_hidden_states")  # a block's own inputs; `temb` is shared by every block


def _bind(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    return inspect.signature(type(block).forward).bind(None, *args, **kwargs).arguments


def _block_inputs(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, list[torch.Tensor]]:
    """(args, kwargs, the inputs to hook): the block's hidden-state inputs that require grad. Their gradients are
    complete when this block's backward is (the time embedding's only once every block's is, so it is left out;
    what its path still needs, autograd has saved). If none requires grad (block 0 when nothing upstream trains),
    the hidden states become a detached leaf that does: same values, in the forward and the recompute alike, so
    checkpointing saves the same tensors both times."""
    bound = _bind(block, args, kwargs)
    hooked = [bound[n] for n in STREAMS if isinstance(bound.get(n), torch.Tensor) and bound[n].requires_grad]
    if hooked or not isinstance(bound.get("hidden_states"), torch.Tensor):
        return args, kwargs, hooked
    leaf = bound["hidden_states"].detach().requires_grad_(True)
    if args and args[0] is bound["hidden_states"]:
        return (leaf, *args[1:]), kwargs, [leaf]
    return args, {**kwargs, "hidden_states": leaf}, [leaf]


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """AuraFlow's transformer blocks: the children of its ModuleLists, in the order its forward runs them (the
    units diffusers' block-level offloading groups)."""
    return [b for c in model.children() if isinstance(c, (torch.nn.ModuleList, torch.nn.Sequential)) for b in c]


def _group_hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(GROUP_HOOK) if registry is not None else None


class GroupOffload:
    """diffusers' group offloading on `model`, plus the hooks that make it hold in training (see the module doc).

    `groups`: every diffusers ModuleGroup; `owned[i]`: the groups that block i's backward is the last to need."""

    def __init__(self, model: torch.nn.Module, folder: DiskFolder | None, stream: bool):
        self.model, self.folder, self.stream = model, folder, stream
        self.in_backward = False
        self.blocks = blocks(model)
        block_of = {id(m): i for i, b in enumerate(self.blocks) for m in b.modules()}
        self.groups = list({id(h.group): h.group for h in self._all_hooks()}.values())
        self.owned: dict[int, list] = {i: [] for i in range(len(self.blocks))}
        for g in self.groups:
            first = g.modules[0] if g.modules else g.offload_leader
            if id(first) in block_of:
                self.owned[block_of[id(first)]].append(g)
        # a group of several blocks is onloaded by its first block's forward, but the backward recomputes its last
        # block first: that block onloads it there (and the first block must not load it again)
        self.spanning = {i: [g for g in self.groups if len(g.modules) > 1 and g.modules[-1] is b]
                         for i, b in enumerate(self.blocks)}
        self._forward_chain: dict | None = None
        self._reversed_chain: dict = {}
        self._grad_hooks: list = []
        self._handles = [model.register_forward_pre_hook(self._enter_forward),
                         model.register_forward_hook(self._leave_forward)]
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._block_pre, i),
                                                                 with_kwargs=True))

    # forward / backward phases
    def _enter_forward(self, module, args):
        self.in_backward = False
        # The last forward's gradient hooks have fired (or never will): drop them. A hook keeps its tensors alive
        # through autograd's C++ objects, so block 0's leaf and its gradient would pile up step after step.
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()
        self._set_onload_self(True)
        if self._forward_chain is not None:
            self._set_chain(self._forward_chain)

    def _leave_forward(self, module, args, output):
        if self.stream and self._forward_chain is None:
            self._forward_chain = self._read_chain()  # diffusers traced the execution order in this first forward
            self._reversed_chain = self._backward_chain()
        if torch.is_grad_enabled():
            self.in_backward = True  # from here until the next forward, block forwards are checkpoint recomputes
            self._set_onload_self(False)
            if self._forward_chain is not None:
                self._set_chain(self._reversed_chain)

    def _block_pre(self, i: int, block, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        args, kwargs, hooked = _block_inputs(block, args, kwargs)
        if self.in_backward:
            for g in self.spanning[i]:
                g.onload_()
        elif hooked:
            self._grad_hooks.append(
                torch.autograd.graph.register_multi_grad_hook(hooked, lambda grads: self.release(i), mode="all"))
        return args, kwargs

    def _set_onload_self(self, value: bool) -> None:
        for gs in self.spanning.values():
            for g in gs:
                g.onload_self = value

    def release(self, i: int) -> None:
        """Block i's backward is done: nothing before it in the backward needs its groups."""
        for g in self.owned[i]:
            g.offload_()

    # the stream's prefetch chain (next_group pointers of diffusers' hooks)
    def _all_hooks(self) -> list:
        return [h for h in map(_group_hook, self.model.modules()) if h is not None]

    def _read_chain(self) -> dict:
        return {id(h): (h, h.next_group) for h in self._all_hooks()}

    def _forward_order(self) -> list:
        """Groups in the order the first forward prefetched them."""
        top = _group_hook(self.model)
        by_group = {id(h.group): h for h in self._all_hooks() if h.group.onload_leader is not None
                    and _group_hook(h.group.onload_leader) is h}
        order, g = [], top.next_group if top is not None else None
        while g is not None and len(order) <= len(self.groups):
            order.append(g)
            h = by_group.get(id(g))
            g = self._forward_chain[id(h)][1] if h is not None else None
        return order

    def _backward_chain(self) -> dict:
        """Blocks in reverse, each block's own groups in forward order (the recompute runs a block forwards)."""
        order = self._forward_order()
        pos = {id(g): n for n, g in enumerate(order)}
        chain = [g for i in reversed(range(len(self.blocks)))
                 for g in sorted(self.owned[i], key=lambda g: pos.get(id(g), 0))]
        nxt = {id(a): b for a, b in zip(chain, chain[1:])}
        return {k: (h, nxt.get(id(h.group))) for k, (h, _) in self._forward_chain.items()}

    @staticmethod
    def _set_chain(chain: dict) -> None:
        for h, next_group in chain.values():
            h.next_group = next_group

    def close(self) -> None:
        """Remove this run's offload folder (the hooks stay: the model is done with)."""
        if self.folder is not None:
            self.folder.remove()


def pin_in_place(model: torch.nn.Module) -> int:
    """With a stream, diffusers keeps a pinned copy of every offloaded tensor, and the unpinned original stays alive
    until the first offload: twice the model in host RAM. Pinned here first, one tensor at a time (each original
    freed as it goes), its copy is this tensor (`pin_memory()` of a pinned tensor is the tensor itself). Returns the
    bytes pinned. CUDA only."""
    pinned = 0
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for t in tensors.values():
                    if t is not None and t.device.type == "cpu" and not t.is_pinned():
                        t.data = t.data.pin_memory()
                        pinned += t.numel() * t.element_size()
    return pinned


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def spill_without_resident_placeholders() -> bool:
    """Before disk offloading: diffusers frees each weight once its file is written and leaves an `empty_like`
    placeholder, allocated before the weight is freed. glibc serves such a placeholder from the chunk the previous
    weight just freed, already resident, so host RAM stays as full as before the spill (measured: 6.5 of 6.5 GiB for
    the real-size int8 model). With a fixed mmap threshold every large allocation is a fresh mapping, untouched and
    so not resident, and a freed one goes back to the system. glibc only; elsewhere nothing changes."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))


def release_freed_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401  diffusers' group offloading moves inputs with accelerate's send_to_device
    except ImportError:
        raise RuntimeError("ENABLE_GROUP_OFFLOAD needs the accelerate package, which this environment lacks") from None


def apply(model: torch.nn.Module, adapter: torch.nn.Module, device: torch.device, policy: Policy,
          fingerprint: str) -> GroupOffload:
    """Offload `model`'s weights in groups, onloaded to `device` as each group runs. `adapter`: the LyCORIS
    network already applied to `model` (its parameters are not the model's: they stay on `device`)."""
    if not getattr(adapter, "loras", None):
        raise ValueError("apply the adapter before group offloading: the offload hooks must wrap its forward")
    _require_accelerate()
    from diffusers.hooks import apply_group_offloading

    stream = policy.use_stream and device.type == "cuda"
    if policy.use_stream and not stream:
        log.warning("GROUP_OFFLOAD_USE_STREAM=true: streams need a CUDA GPU; on %s groups load without one",
                    device.type)
    if stream and not policy.disk_root:  # from disk, diffusers pins each group as it reads it back
        pin_in_place(model)
    folder = DiskFolder(Path(policy.disk_root), fingerprint) if policy.disk_root else None
    if folder and folder.swept:
        log.info("removed %d offload folder(s) left by runs that died: %s", len(folder.swept),
                 ", ".join(p.name for p in folder.swept))
    if folder:
        spill_without_resident_placeholders()
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), offload_type=policy.kind,
                           num_blocks_per_group=policy.blocks_per_group if policy.kind == "block_level" else None,
                           use_stream=stream, record_stream=stream,
                           offload_to_disk_path=str(folder.path) if folder else None)
    if folder:
        release_freed_heap()
    return GroupOffload(model, folder, stream)
