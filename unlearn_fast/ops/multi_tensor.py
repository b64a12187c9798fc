"""Multi-tensor SAM ops: global gradient norm, perturb with backup, exact restore (SPEC §1.3).

    n   = ‖g‖₂ over every tensor            (ASAM: ‖|θ|⊙g‖₂)
    s   = ρ / max(n, tiny)                  (n = 0 → s = 0: no perturbation, never NaN)
    θ  ← θ + s · g                          (ASAM: θ + s · |θ|²⊙g)
The norm stays on the device (no host sync); under torch.distributed the squared
norm is all-reduced before the square root (tensors are shards of one gradient; inside
``replicated_gradients()`` each process holds the whole gradient and nothing is reduced). The backup is the weights as they
were, so the restore is a copy: bit-exact in every dtype.

Engines behind the same three functions (``backend=``, default ``UNLEARN_FAST_SAM_BACKEND`` or "auto"):
  "cpp"    the compiled multi-tensor ops of csrc/ (one pass per op over the whole list; CPU:
           at::parallel_for, CUDA: multi-tensor apply), JIT-built at first use (ops/_cpp.py);
  "triton" single launches over one flat buffer, when the tensors are views of one buffer per
           dtype (``uf.flatten_parameters``) on CUDA (or under TRITON_INTERPRET=1);
  "torch"  ``torch._foreach_*``: the fallback, always available.
"auto" picks triton for flat CUDA buffers, else cpp when it builds (on the CPU: when it is built for
the host's vector unit, see ops/_cpp.py; UNLEARN_FAST_NO_CPP=1 turns it off), else torch. All engines give the same numbers up to one rounding (tests compare each to the
naive per-parameter loop).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch

from ._checks import _triton_available

_TINY = 1e-12
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "cpp", "triton")


@dataclass
class SAMState:
    """What ``sam_restore_`` needs: the moved tensors, their backup, and the global norm (fp32 device scalar)."""

    params: list[torch.Tensor]
    backup: list[torch.Tensor]
    norm: torch.Tensor
    scale: torch.Tensor
    restored: bool = field(default=False)
    backend: str = field(default="torch")
    has_backup: bool = field(default=True)
    # (param, backup) pairs that traded storage in sam_perturb_(exchange=True): the param holds θ' in what was
    # the backup's storage and the backup holds θ; undo_exchange() trades them back (no copy)
    exchanged: list = field(default_factory=list)

    def undo_exchange(self) -> None:
        """Trade the exchanged pairs' storage back: each param holds θ again, its backup θ'."""
        for p, b in self.exchanged:
            _trade_storage(p, b)
        self.exchanged = []


def _check_list(name: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be a floating tensor, got {t.dtype}")
    return tensors


def _pairs(params, grads, pname="params", gname="grads"):
    params = _check_list(pname, params)
    grads = _check_list(gname, grads)
    if len(params) != len(grads):
        raise ValueError(f"{pname} and {gname} must have the same length, got {len(params)} and {len(grads)}")
    kept_p, kept_g = [], []
    device = None
    for i, (p, g) in enumerate(zip(params, grads)):
        if p is None or g is None:
            continue
        if p.shape != g.shape:
            raise ValueError(f"{gname}[{i}] has shape {tuple(g.shape)}, expected {pname}[{i}]'s {tuple(p.shape)}")
        if device is None:
            device = p.device
        if p.device != device or g.device != device:
            raise ValueError(f"{pname}[{i}] and {gname}[{i}] must be on {device}, got {p.device} and {g.device}")
        kept_p.append(p)
        kept_g.append(g)
    return kept_p, kept_g, device


_replicated_depth = 0  # > 0 inside ``replicated_gradients()``


@contextlib.contextmanager
def replicated_gradients():
    """Inside the block the norm is taken as local: every process holds the whole (already averaged) gradient.

    Under torch.distributed the ops otherwise treat each process's tensors as shards of one global
    gradient (FSDP-style) and sum the squared norms across processes. Data parallelism that
    all-reduces gradients before SAM (DDP-style) must not sum again: that would inflate the
    norm by √world.
    """
    global _replicated_depth
    _replicated_depth += 1
    try:
        yield
    finally:
        _replicated_depth -= 1


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if _replicated_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# -- engine selection ------------------------------------------------------------------------------

def _cpp_usable(device: torch.device) -> bool:
    """Whether "auto" may take the compiled path: it builds, and on the CPU it was built for a vector unit.

    The compiled CPU kernels do one pass per op with the host's vectors and non-temporal stores,
    so they move fewer bytes than the foreach ops at the same width; a portable (unvectorised)
    build has no such guarantee, so "auto" keeps the foreach path there (``backend="cpp"`` still
    takes it).
    """
    from . import _cpp

    if not _cpp.available(device):
        return False
    return device.type != "cpu" or _cpp.vectorised()


def resolve_backend(backend, tensors, others=None) -> str:
    """The engine for these tensors (and ``others``, the list they are combined with; see the module docstring)."""
    if backend is None:
        backend = os.environ.get("UNLEARN_FAST_SAM_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not tensors:
        return "torch"
    device = tensors[0].device
    if backend == "auto":
        from unlearn_fast.flatten import flat_groups

        no_fp64 = all(t.dtype != torch.float64 for t in tensors + list(others or []))
        if device.type == "cuda" and no_fp64 and flat_groups(tensors, others) is not None and _triton_available():
            return "triton"
        if _cpp_compatible(tensors, others) and _cpp_usable(device):
            return "cpp"
        return "torch"
    if backend == "cpp":
        from . import _cpp

        if not _cpp_compatible(tensors, others):
            raise ValueError("backend='cpp' needs contiguous CPU/CUDA tensors with matching dtypes in each pair")
        _cpp.load(device)  # raises a RuntimeError naming what is missing
    if backend == "triton":
        from ._checks import resolve_backend as resolve_kernel_backend

        resolve_kernel_backend("triton", device)
    return backend


def _cpp_compatible(tensors, others) -> bool:
    if tensors[0].device.type not in ("cpu", "cuda"):
        return False
    if not all(t.is_contiguous() for t in tensors):
        return False
    return others is None or all(o.is_contiguous() and o.dtype == t.dtype for t, o in zip(tensors, others))


# -- torch (foreach) path ------------------------------------------------------------------------

def _squared_norm(tensors, weights=None) -> torch.Tensor:
    if weights is None:
        parts = [t.detach().float() for t in tensors]
    else:
        parts = [w.detach().float().abs() * t.detach().float() for t, w in zip(tensors, weights)]
    norms = torch._foreach_norm(parts, 2)
    return torch.stack(norms).square().sum()


def _torch_perturb(params, grads, out, scale, adaptive, backup=None):
    """out ← θ + s·w⊙g (out is params: moved in place; or the exchange's backup), backup ← θ first when given.

    fp32 arithmetic (fp64 for fp64 weights), never scaling the caller's grads; one rounding to p's dtype.
    The steps are copied before anything is written: out or the backup may be the grads themselves."""
    steps = [g.detach().to(_opmath(p.dtype), copy=True) for p, g in zip(params, grads)]
    if backup is not None and backup is not params:
        torch._foreach_copy_(backup, [p.detach() for p in params])
    if adaptive:
        steps = [s.mul_(p.detach().to(s.dtype).square()) for s, p in zip(steps, params)]
    torch._foreach_mul_(steps, scale)
    for p, o, s in zip(params, out, steps):
        o.copy_(s.add_(p.detach().to(s.dtype)))


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _squared_norm_by(backend, tensors, weights) -> torch.Tensor:
    """Σ ‖w⊙t‖² over the list as an fp32 device scalar (not yet all-reduced)."""
    if backend == "cpp":
        from . import _cpp

        weights = [w.detach() for w in weights] if weights else []
        return _cpp.ops().squared_norm([t.detach() for t in tensors], weights, False)[0]
    if backend == "triton":
        from unlearn_fast.flatten import flat_groups
        from unlearn_fast.kernels import multi_tensor as k

        total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        for flat, wflat in flat_groups(tensors, weights):
            total = total + k.squared_norm(flat, wflat)
        return total
    return _squared_norm(tensors, weights)


# -- public ops ----------------------------------------------------------------------------------

def global_grad_norm(tensors, *, adaptive_params=None, backend: str | None = None) -> torch.Tensor:
    """‖tensors‖₂ as one fp32 device scalar (‖|adaptive_params|⊙tensors‖₂ for ASAM); None entries are skipped."""
    tensors = _check_list("tensors", tensors)
    if adaptive_params is not None:
        adaptive_params = _check_list("adaptive_params", adaptive_params)
        if len(adaptive_params) != len(tensors):
            raise ValueError(f"adaptive_params must have the same length as tensors, got "
                             f"{len(adaptive_params)} and {len(tensors)}")
        tensors, weights, _ = _pairs(adaptive_params, tensors, "adaptive_params", "tensors")
        tensors, weights = weights, tensors
    else:
        tensors, weights = [t for t in tensors if t is not None], None
        if any(t.device != tensors[0].device for t in tensors):
            raise ValueError("tensors must all be on one device")
    engine = resolve_backend(backend, tensors, weights)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    return _all_reduce_sum(_squared_norm_by(engine, tensors, weights)).sqrt()


def _check_backup(backup, params):
    backup = _check_list("backup", backup)
    if len(backup) != len(params):
        raise ValueError(f"backup must have one tensor per moved parameter ({len(params)}), got {len(backup)}")
    for i, (b, p) in enumerate(zip(backup, params)):
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
            raise ValueError(f"backup[{i}] must match params[{i}] in shape, dtype and device")
    return backup


def _sole_owner(t: torch.Tensor) -> bool:
    """t is a plain dense tensor that is the only view of its whole storage (no other view or alias of it).

    A graph that saved t does not show here (it holds t itself): the trade bumps t's version counter instead."""
    # a plain tensor or parameter (no wrapper subclass such as DTensor), dense, contiguous from its storage's start
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or not t.is_contiguous() \
            or t.storage_offset() != 0:
        return False
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size():
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # this tensor's reference and the `storage` wrapper's; any other view or alias adds one
    return use_count is not None and use_count(storage._cdata) == 2


def _exchangeable(params, backup) -> list[bool]:
    seen: set[int] = set()
    flags = []
    for p, b in zip(params, backup):
        ok = (b is not p and id(p) not in seen and id(b) not in seen and p.dtype == b.dtype and p.device == b.device
              and p.shape == b.shape and _sole_owner(p) and _sole_owner(b))
        seen.update((id(p), id(b)))
        flags.append(ok)
    return flags


def _trade_storage(a: torch.Tensor, b: torch.Tensor) -> None:
    a_data, b_data = a.data, b.data
    a.data, b.data = b_data, a_data
    _bump_versions([a, b])


def _bump_versions(tensors) -> None:
    """Count a change made outside autograd's sight (a storage trade, a compiled kernel's write) as an in-place
    one: a live graph that saved one of these tensors then fails at backward instead of using the new values."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


@torch.no_grad()
def sam_perturb_(params, grads, rho: float, *, adaptive: bool = False, backend: str | None = None,
                 backup=None, keep_backup: bool = True, exchange: bool = False) -> SAMState:
    """θ ← θ + ρ·g/‖g‖ in place (ASAM: ρ·|θ|²⊙g/‖|θ|⊙g‖), keeping a backup for ``sam_restore_``.

    ``backup``: optional preallocated tensors (one per parameter that has a gradient, in order) to
    reuse across steps; by default a fresh one is allocated. It may be ``grads`` itself when the caller
    has no further use for them (SAM's ascent direction): each element of g is read before θ is written
    over it, so the direction's storage becomes the backup and the step allocates nothing.
    ``keep_backup=False``: no backup at all, for weights that are recomputed from fp32 masters
    anyway (the trainer's bf16 model weights); such a state is restored with
    ``uf.optim.restore_from_masters``, not ``sam_restore_``.
    ``exchange=True``: θ' is written into the backup's storage (read θ and g, write one buffer) and each
    parameter then trades storage with its backup, so the parameter holds θ' and the backup θ, as above;
    ``sam_restore_`` trades them back instead of copying. One parameter-sized write per step instead of
    three. Only pairs that are the sole owners of their whole storage are exchanged (no view of a flat
    buffer, no alias; the Triton flat path never); the rest are copied. The trade counts as an in-place
    change: a live graph that saved a parameter fails at backward, as after the copy path.
    While moved, an exchanged parameter's ``data_ptr()`` is its backup's: code that caches weight
    addresses (CUDA graphs) must leave this off.
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0 or math.isinf(rho):
        raise ValueError(f"rho must be a finite non-negative number, got {rho!r}")
    in_place = backup is grads  # the direction's storage becomes the backup (its None entries dropped alike)
    params, grads, device = _pairs(params, grads)
    engine = resolve_backend(backend, params, grads)
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return SAMState([], [], zero, zero, backend=engine)
    if in_place:
        # the caller's own tensors when they may trade storage (they must hold θ afterwards), else aliases
        backup = list(grads) if exchange and keep_backup else [g.detach() for g in grads]
    if not keep_backup:
        backup = params  # the kernels write θ over itself before moving it: no extra memory
    elif backup is not None:
        backup = _check_backup(backup, params)
    else:
        backup = _new_backup(params, engine)
    norm = _all_reduce_sum(_squared_norm_by(engine, grads, params if adaptive else None)).sqrt()
    scale = rho / norm.clamp_min(_TINY)  # n = 0 gives s = 0 (and 0·g = 0), never NaN
    exchanged = []
    if exchange and keep_backup and engine != "triton":
        flags = _exchangeable(params, backup)
        ex = [(p, g, b) for p, g, b, f in zip(params, grads, backup, flags) if f]
        if ex:
            ex_p, ex_g, ex_b = (list(t) for t in zip(*ex))
            _perturb_into(engine, ex_p, ex_g, ex_b, scale, adaptive)
            for p, b in zip(ex_p, ex_b):
                _trade_storage(p, b)
            exchanged = list(zip(ex_p, ex_b))
            rest = [(p, g, b) for p, g, b, f in zip(params, grads, backup, flags) if not f]
            params, grads, backup = (list(t) for t in zip(*rest)) if rest else ([], [], [])
    if params:
        _perturb_with_backup(engine, params, grads, backup, scale, adaptive)
    return SAMState(params, backup if keep_backup else [], norm, scale, backend=engine, has_backup=keep_backup,
                    exchanged=exchanged)


def _perturb_into(engine, params, grads, out, scale, adaptive):
    """out ← θ + s·w⊙g with θ untouched (the exchange path; out may be grads)."""
    if engine == "cpp":
        from . import _cpp

        _cpp.ops().perturb_to_([p.detach() for p in params], [g.detach() for g in grads], out, scale, adaptive)
    else:
        _torch_perturb(params, grads, out, scale, adaptive)


def _perturb_with_backup(engine, params, grads, backup, scale, adaptive):
    """backup ← θ (skipped when backup is params), θ ← θ + s·w⊙g, on the engine's kernels."""
    if engine == "cpp":
        from . import _cpp

        _cpp.ops().perturb_(params, grads, backup, scale, adaptive)
        _bump_versions(params)
    elif engine == "triton":
        from unlearn_fast.flatten import flat_groups
        from unlearn_fast.kernels import multi_tensor as k

        for (pf, gf), (bf, _) in zip(flat_groups(params, grads), flat_groups(backup, params)):
            k.perturb_(pf, gf, bf, scale, adaptive)
        _bump_versions(params)
    else:
        _torch_perturb(params, grads, params, scale, adaptive, backup=backup)


def _new_backup(params, engine):
    if engine == "triton":  # the Triton path wants the backup flat as well
        from unlearn_fast.flatten import flat_like

        return flat_like(params)
    return [torch.empty_like(p, memory_format=torch.preserve_format).detach() for p in params]


@torch.no_grad()
def sam_restore_(state: SAMState) -> None:
    """Put the weights back exactly as they were before ``sam_perturb_`` (a copy of the backup; exchanged pairs
    trade storage back, after which their backup holds θ')."""
    if not isinstance(state, SAMState):
        raise TypeError(f"state must be the SAMState returned by sam_perturb_, got {type(state).__name__}")
    if state.restored:
        raise RuntimeError("this SAMState was already restored")
    if not state.has_backup:
        raise RuntimeError("this SAMState has no backup (keep_backup=False): recompute the weights from their "
                           "fp32 masters (uf.optim.restore_from_masters)")
    state.undo_exchange()
    if state.params:
        if state.backend == "cpp":
            from . import _cpp

            _cpp.ops().restore_(state.params, state.backup)
            _bump_versions(state.params)
        elif state.backend == "triton":
            from unlearn_fast.flatten import flat_groups
            from unlearn_fast.kernels import multi_tensor as k

            for pf, bf in flat_groups(state.params, state.backup):
                k.restore_(pf, bf)
            _bump_versions(state.params)
        else:
            torch._foreach_copy_(state.params, state.backup)
    state.backup = []
    state.restored = True


@torch.no_grad()
def fd_hvp_accumulate_(acc, g_moved, g_base, coeff, *, restore: SAMState | None = None,
                       backend: str | None = None) -> None:
    """acc ← acc + coeff·(g_moved − g_base) (g_base None: acc + coeff·g_moved), then ``sam_restore_(restore)``.

    The step of a finite-difference Hessian-vector product (SPEC §1.2, §1.4): with g_moved the
    gradient at θ + r v/‖v‖, g_base the one at θ and coeff = ‖v‖/r, acc gains H v. ``coeff`` may be
    a device scalar. The compiled path does the accumulation and the restore in one pass.
    """
    acc = _check_list("acc", acc)
    g_moved = _check_list("g_moved", g_moved)
    if len(acc) != len(g_moved):
        raise ValueError(f"acc and g_moved must have the same length, got {len(acc)} and {len(g_moved)}")
    if g_base is not None:
        g_base = _check_list("g_base", g_base)
        if len(g_base) != len(acc):
            raise ValueError(f"g_base must have the length of acc ({len(acc)}), got {len(g_base)}")
    for i, (a, g) in enumerate(zip(acc, g_moved)):
        if a is None or g is None or a.shape != g.shape or a.device != g.device:
            raise ValueError(f"g_moved[{i}] must match acc[{i}] in shape and device")
        if g_base is not None and (g_base[i] is None or g_base[i].shape != g.shape or g_base[i].dtype != g.dtype):
            raise ValueError(f"g_base[{i}] must match g_moved[{i}] in shape and dtype")
    if restore is not None and not isinstance(restore, SAMState):
        raise TypeError(f"restore must be a SAMState, got {type(restore).__name__}")
    if not acc:
        if restore is not None:
            sam_restore_(restore)
        return
    device = acc[0].device
    coeff_t = torch.as_tensor(coeff, dtype=torch.float32).to(device)
    engine = resolve_backend(backend, acc)
    same_dtypes = all(g.dtype == g_moved[0].dtype for g in g_moved)
    if engine == "cpp" and _cpp_compatible(g_moved, None):
        from . import _cpp

        # The restore joins the accumulation pass when the state's backup is a compiled-path one.
        fused = (restore is not None and restore.backend == "cpp" and restore.has_backup and not restore.restored
                 and same_dtypes)
        if fused:
            restore.undo_exchange()  # exchanged pairs trade back; the fused pass copies the rest
        _cpp.ops().fd_hvp_accumulate_(acc, [g.detach() for g in g_moved],
                                      [g.detach() for g in g_base] if g_base is not None else [], coeff_t,
                                      restore.params if fused else [], restore.backup if fused else [])
        if fused:
            _bump_versions(restore.params)
            restore.backup = []
            restore.restored = True
            return
    elif engine == "triton" and same_dtypes and _fd_hvp_triton(acc, g_moved, g_base, coeff_t):
        pass
    else:
        diff = [g.detach().to(_opmath(a.dtype), copy=True) for a, g in zip(acc, g_moved)]
        if g_base is not None:
            torch._foreach_sub_(diff, [g.detach().to(d.dtype) for d, g in zip(diff, g_base)])
        torch._foreach_mul_(diff, coeff_t)
        for a, d in zip(acc, diff):
            a.copy_(d.add_(a.to(d.dtype)))
    if restore is not None:
        sam_restore_(restore)


def _fd_hvp_triton(acc, g_moved, g_base, coeff_t) -> bool:
    """One ``_fd_hvp_kernel`` launch per flat run of (acc, g_moved[, g_base]); False (nothing done) when the
    lists are not laid out run for run in flat buffers, so the caller takes the foreach path."""
    from unlearn_fast.flatten import flat_groups
    from unlearn_fast.kernels import multi_tensor as k

    moved = flat_groups(acc, g_moved)
    base = flat_groups(acc, g_base) if g_base is not None else None
    if moved is None or (g_base is not None and (base is None or len(base) != len(moved))):
        return False
    if any(af.dtype == torch.float64 or gf.dtype == torch.float64 for af, gf in moved):
        return False
    for i, (af, gf) in enumerate(moved):
        k.fd_hvp_accumulate_(af, gf.detach(), base[i][1].detach() if base is not None else None, coeff_t)
    return True
