"""Forward gradients on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a DTensor holding this rank's rows (a dim-0 shard) and, while a
module runs, gives the module a plain tensor with the whole parameter (all-gathered), freed
again after. A forward-gradient step on such parameters:

1. keys each trained parameter's tangent on that gathered tensor, so the closure's forward
   pass draws a layer's full tangent (from the counter-based stream) only while FSDP2 holds
   the layer gathered, and FSDP2's own reads of the shards are left alone;
2. reshards every FSDP2 module that ran: FSDP2 keeps its root gathered after a forward pass
   in wait for a backward pass, and a gathered root would run the next step on stale values;
3. averages the K directional derivatives over the FSDP2 mesh (K floats, the only traffic
   besides FSDP2's all-gathers: no gradient is reduce-scattered or all-reduced);
4. redraws, for the update, only the rows of each tangent that the rank's shard holds.

No rank holds the whole model or a whole tangent beyond the layer in flight, and each rank's
update writes its own shard only. :func:`sharding` is the entry point; what it cannot handle
(FSDP1, DeepSpeed ZeRO-3, tensor parallelism, CPU offload, other placements) it refuses with
:class:`~fwdgrad_plugins.errors.UnsupportedShardingError` before anything changes. FSDP2's
bookkeeping is private to torch: every read of it is in :func:`_torch_bookkeeping`, which
refuses clearly if a torch release changes it.

>>> import torch
>>> sharding(list(torch.nn.Linear(2, 2).parameters())) is None   # nothing sharded
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fwdgrad_plugins.errors import UnsupportedShardingError
from fwdgrad_plugins.tangents.streaming import CounterStream, LazyDirection, TangentStream, tangent_stream
from fwdgrad_plugins.tangents.tangent import RankOne

_FSDP2 = "FSDP2 (torch.distributed.fsdp.fully_shard; in Accelerate, fsdp_version: 2)"


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (a second
    or more) for a process that never made one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclasses.dataclass
class _Record:
    """What FSDP2 knows of one sharded parameter, read by :func:`_torch_bookkeeping`."""

    module: nn.Module  # the FSDPModule that gathers it
    gathered: Tensor  # the tensor the module computes with while gathered
    offload: bool  # CPU offload (OffloadPolicy)
    nested_dtensor: bool  # gathered as a DTensor: FSDP2 over tensor parallelism


def _torch_bookkeeping(params: Sequence[Tensor]) -> tuple[list[str], dict[int, _Record]]:
    """The names of torch's other sharding wrappers that hold any of ``params`` (FSDP1), and
    FSDP2's record of each of ``params`` that it shards (by ``id``).

    The one place that reads torch internals: the FSDP1 flag on its parameters, the registry
    of composable states, each FSDP2 state's parameter groups, and each ``FSDPParam``'s
    sharded and unsharded parameter. An unsharded parameter is created by FSDP2's first
    all-gather, and kept (its storage freed and refilled) from then on; for one not gathered
    yet, the module is gathered and resharded once here (``FSDPModule.unshard/reshard``), so
    that the tensor exists and keeps its identity. Any change to these internals is refused
    with the torch version that changed them."""
    wrappers = ["FSDP1 (FullyShardedDataParallel)"] if any(
        getattr(p, "_fsdp_flattened", False) for p in params) else []
    wanted = {id(p) for p in params if _is_dtensor(p)}
    records: dict[int, _Record] = {}
    if not wanted:
        return wrappers, records
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule

        for module in list(_module_state_mapping.keys()):
            if not isinstance(module, FSDPModule):
                continue
            for group in module._get_fsdp_state()._fsdp_param_groups:
                owned = [fp for fp in group.fsdp_params if id(fp.sharded_param) in wanted]
                if owned and not all(hasattr(fp, "_unsharded_param") for fp in owned):
                    module.unshard()  # FSDP2's first all-gather creates the unsharded parameters
                    module.reshard()
                for fp in owned:
                    gathered = fp._unsharded_param
                    if gathered.shape != fp.sharded_param.shape:
                        raise AttributeError(f"unsharded shape {tuple(gathered.shape)}")
                    records[id(fp.sharded_param)] = _Record(
                        module, gathered, bool(fp.offload_to_cpu), fp._unsharded_dtensor_spec is not None)
        return wrappers, records
    except (ImportError, AttributeError, TypeError) as error:
        raise UnsupportedShardingError(
            f"torch {torch.__version__} changed FSDP2's internal bookkeeping ({type(error).__name__}: "
            f"{error}), which forward gradients on sharded parameters read to find the gathered "
            "parameters: use the torch release this package supports (see pyproject.toml), or "
            "train unsharded (replicated, with reduce=) until fwdgrad-plugins supports this one."
        ) from error


class ShardRows(TangentStream):
    """The rows of a stream's tangents that this rank's shards hold: ``rows[i]`` is
    ``(start, stop)`` along dimension 0 of parameter ``i``, or None for the whole of it. A
    rank-one tangent u wᵀ gives its u rows and all of w. Each draw is of those rows alone."""

    def __init__(self, stream: CounterStream, rows: Sequence[Optional[tuple[int, int]]]):
        self.stream = stream
        self.params = stream.params
        self.num_directions = stream.num_directions
        self.rows = list(rows)

    def draw(self, index: int, k: int):
        rows = self.rows[index]
        return self.stream.draw(index, k) if rows is None else self.stream.draw_rows(index, k, *rows)

    def draw_all(self, index: int):
        directions = [self.draw(index, k) for k in range(self.num_directions)]
        if isinstance(directions[0], tuple):
            return RankOne(*(torch.stack(factors) for factors in zip(*directions)))
        return torch.stack(directions)


@dataclasses.dataclass
class Sharding:
    """Trained parameters of which some are FSDP2 shards, and how a step reaches them.

    ``gathered[i]`` is the tensor the closure computes with (FSDP2's gathered parameter, or
    the parameter itself where it is not sharded), ``local[i]`` the tensor an update writes
    (the rank's shard as a plain tensor, or the parameter), ``rows[i]`` the shard's rows of
    the whole parameter (None: the whole)."""

    params: list[Tensor]
    gathered: list[Tensor]
    local: list[Tensor]
    rows: list[Optional[tuple[int, int]]]
    group: dist.ProcessGroup
    modules: list[nn.Module]

    def mean(self, derivatives: Tensor) -> Tensor:
        """The mean of ``derivatives`` over the FSDP2 mesh (each rank's own batch)."""
        total = derivatives.clone()
        dist.all_reduce(total, group=self.group)
        return total / dist.get_world_size(self.group)

    def forward_tangents(self, sampler, num_directions: int, seed: int) -> "GatheredTangents":
        """The step's tangents keyed on the gathered parameters, drawn per layer as it runs."""
        return GatheredTangents(_counter_stream(sampler, self.gathered, num_directions, seed))

    def local_tangents(self, sampler, num_directions: int, seed: int) -> ShardRows:
        """The same tangents, restricted to this rank's rows, in the shards' dtypes."""
        return ShardRows(_counter_stream(sampler, self.params, num_directions, seed), self.rows)

    def derivatives(self, estimator, closure, sampler, num_directions: int, seed: int):
        """``estimator.derivatives`` of ``closure`` along the step's tangents, keyed on the
        gathered parameters, with the modules resharded after; its frozen rows numbered
        within the shards."""
        tangents = self.forward_tangents(sampler, num_directions, seed)
        with self.forward_pass(tangents):
            result = estimator.derivatives(closure, self.gathered, tangents)
        return dataclasses.replace(result, frozen_rows=self.local_frozen_rows(result.frozen_rows))

    def local_frozen_rows(self, frozen_rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Rows no update may touch (an embedding's padding row), numbered within the shard."""
        local = []
        for rows, found in zip(self.rows, frozen_rows):
            start, stop = rows if rows is not None else (0, math.inf)
            local.append([r - start for r in found if start <= r < stop])
        return local

    def as_grad(self, index: int, local: Optional[Tensor]) -> Optional[Tensor]:
        """A local estimate as the parameter's ``.grad``: a DTensor shard for a sharded one."""
        param = self.params[index]
        if local is None or not _is_dtensor(param):
            return local
        return type(param).from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    @contextlib.contextmanager
    def forward_pass(self, tangents: Optional["GatheredTangents"] = None) -> Iterator[None]:
        """Run the closure inside; every FSDP2 module that ran is resharded after, even on
        an error (a gathered root would serve the next forward pass stale parameters).

        With the step's ``tangents``, FSDP2's own work on the gathered parameters (gathering
        them before a module runs, resharding them after) draws no tangent: the parameter
        swap would otherwise draw a layer's tangents for FSDP2's reads of the tensors it
        fills, to no use, and hold them while the layer's all-gather buffers are live. The
        tangents a pass keeps for a module's repeated lookups are dropped when any module's
        forward ends (a later use, such as a tied embedding's at the language-model head,
        redraws the same values): so the embedding's tangent is not held through the blocks,
        nor the head's through the loss. On CPU each module is gathered here, just before
        FSDP2's pre-forward hook would, so that the all-gather's output buffer is freed
        once it is copied out: in a forward pass FSDP2 keeps it until the next module's
        all-gather, to overlap the two on a GPU's streams, which a CPU does not have."""
        from torch.distributed.fsdp import FSDPModule

        ran: dict[int, nn.Module] = {id(m): m for m in self.modules}

        outer = _outer_units(self.modules) if tangents is not None else {}

        def record(module, args):
            if isinstance(module, FSDPModule):
                ran.setdefault(id(module), module)
                for unit, (_, nested) in outer.items():
                    if id(module) in nested:
                        with tangents.paused():
                            unit.reshard()  # a no-op unless the unit reshards after forward

        handles = [nn.modules.module.register_module_forward_pre_hook(record)]
        for unit, (users, _) in outer.items():

            def gather(module, args, unit=unit):
                with tangents.paused():
                    handle = unit.unshard(async_op=True)  # (a no-op if gathered) waited at once,
                    if handle is not None:  # so its all-gather buffer is freed after copy-out
                        handle.wait()

            def reshard(module, args, output, unit=unit):
                with tangents.paused():
                    unit.reshard()  # a no-op unless the unit reshards after forward

            handles += [user.register_forward_pre_hook(gather) for user in users]
            handles.append(users[-1].register_forward_hook(reshard))  # e.g. before the loss
        if tangents is not None:
            gather_here = all(g.device.type == "cpu" for g in self.gathered)

            def before_fsdp_pre_forward(module, args):
                tangents.pause()
                tangents.release()
                if gather_here:
                    module.unshard()

            def before_fsdp_post_forward(module, args, output):
                tangents.pause()

            def after_fsdp_hook(module, *args):
                tangents.resume()

            def after_any_module(module, args, output):
                tangents.release()

            handles.append(nn.modules.module.register_module_forward_hook(after_any_module))

            for module in self.modules:  # FSDP2's hooks: pre-forward prepended, post-forward appended
                handles += [module.register_forward_pre_hook(before_fsdp_pre_forward, prepend=True),
                            module.register_forward_pre_hook(after_fsdp_hook),
                            module.register_forward_hook(before_fsdp_post_forward, prepend=True),
                            module.register_forward_hook(after_fsdp_hook)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            if tangents is not None:
                tangents.resume()
                tangents.release()
            for module in ran.values():
                module.reshard()


class GatheredTangents(CounterStream):
    """A :class:`~fwdgrad_plugins.tangents.streaming.CounterStream` keyed on FSDP2's
    gathered parameters (the same draws), whose direction mappings :meth:`pause` hides while
    FSDP2 itself touches those tensors, and whose kept tangents :meth:`release` drops."""

    def __init__(self, stream: CounterStream):
        self.__dict__.update(stream.__dict__)
        self.hidden = False
        self._directions: "weakref.WeakSet[_PausableDirection]" = weakref.WeakSet()

    def direction_mapping(self, k: int) -> LazyDirection:
        direction = _PausableDirection(self, k)
        self._directions.add(direction)
        return direction

    def pause(self) -> None:
        self.hidden = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was, self.hidden = self.hidden, True
        try:
            yield
        finally:
            self.hidden = was

    def resume(self) -> None:
        self.hidden = False

    def release(self) -> None:
        for direction in list(self._directions):
            direction.release()


class _PausableDirection(LazyDirection):
    """A :class:`LazyDirection` that holds no parameter while its stream is paused."""

    def __getitem__(self, key: int):
        if self.stream.hidden:
            raise KeyError(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return not self.stream.hidden and super().__contains__(key)

    __hash__ = object.__hash__  # (a Mapping's __eq__ would leave it unhashable, and a WeakSet hashes)
    __eq__ = object.__eq__


def _outer_units(modules: Sequence[nn.Module]) -> dict:
    """The FSDP2 units among ``modules`` that hold other units (a model's root), each as
    ``unit: (users, nested)``: ``users`` the modules of the unit's own that hold its
    parameters, in the order the unit registers them (a GPT-2's embeddings, final norm and
    tied head), ``nested`` the ids of the units inside it. A unit that computes with a
    parameter of its own directly (not through such a module), or has none, is left out.

    A unit set to reshard after forward (``fully_shard(model, reshard_after_forward=True)``;
    FSDP2 keeps the root gathered otherwise, for a backward pass that a forward-gradient step
    does not run) is then resharded while the units inside it run and after its last user,
    and gathered again before a user runs: the same values, one more all-gather of the unit
    per step where its users run before and after the units inside it."""
    from torch.distributed.fsdp import FSDPModule

    found = {}
    for unit in modules:
        inner = [m for m in unit.modules() if m is not unit and isinstance(m, FSDPModule)]
        nested = {id(m) for unit_inside in inner for m in unit_inside.modules()}
        users = [m for m in unit.modules() if m is not unit and id(m) not in nested
                 and next(m.parameters(recurse=False), None) is not None]
        if inner and users and next(unit.parameters(recurse=False), None) is None:
            found[unit] = (users, {id(m) for m in inner})
    return found


def _counter_stream(sampler, params, num_directions: int, seed: int) -> CounterStream:
    stream = tangent_stream(sampler, params, num_directions, seed)
    if not isinstance(stream, CounterStream):
        raise UnsupportedShardingError(
            f"the tangent sampler {type(sampler).__name__} draws whole tangents only (it has no "
            "stream() drawing a parameter's tangents on their own), so on sharded parameters "
            "every rank would hold every full tangent: use tangents='gaussian', 'rademacher' or "
            "'rank1-gaussian'."
        )
    return stream


def sharding(params: Sequence[Tensor]) -> Optional[Sharding]:
    """The :class:`Sharding` of ``params`` if FSDP2 shards any of them, else None.

    Raises :class:`~fwdgrad_plugins.errors.UnsupportedShardingError`, before any state
    changes, for parameters held by FSDP1 or DeepSpeed ZeRO-3, DTensors that FSDP2 does not
    manage (tensor parallelism), FSDP2 over tensor parallelism or on a 2-D mesh (HSDP),
    sharding along another dimension than 0, CPU offload, and shards on several meshes."""
    refuse_other_wrappers(params)
    wrappers, records = _torch_bookkeeping(params)
    if wrappers:
        raise UnsupportedShardingError(
            f"these parameters are sharded by {wrappers[0]}, whose flat parameters are gathered "
            "into other tensors during the forward pass, so forward gradients cannot key "
            f"tangents on them: shard the model with {_FSDP2} instead."
        )
    if not records:
        for p in params:
            if _is_dtensor(p):
                _refuse_dtensor(p)
        return None
    gathered, local, rows, modules, meshes = [], [], [], {}, set()
    for p in params:
        record = records.get(id(p))
        if record is None:
            if _is_dtensor(p):
                _refuse_dtensor(p)
            gathered.append(p), local.append(p), rows.append(None)
            continue
        _check_fsdp2(p, record)
        meshes.add(p.device_mesh)
        modules.setdefault(id(record.module), record.module)
        mesh = p.device_mesh
        chunk = -(-p.shape[0] // mesh.size())
        start = min(mesh.get_local_rank() * chunk, p.shape[0])
        shard = p.to_local()
        if shard.shape[0] != min(start + chunk, p.shape[0]) - start:
            raise UnsupportedShardingError(
                f"a parameter of shape {tuple(p.shape)} has a shard of {shard.shape[0]} rows on "
                f"rank {mesh.get_local_rank()} of {mesh.size()}, not the rows of torch.chunk that "
                f"{_FSDP2} uses: shard it with fully_shard's default placement."
            )
        gathered.append(record.gathered), local.append(shard), rows.append((start, start + shard.shape[0]))
    if len(meshes) > 1:
        raise UnsupportedShardingError(
            f"the parameters are sharded over {len(meshes)} different device meshes: forward "
            "gradients average the directional derivatives over one FSDP2 mesh; shard the "
            "whole model over one mesh (fully_shard(..., mesh=mesh) for every module)."
        )
    return Sharding(list(params), gathered, local, rows, meshes.pop().get_group(), list(modules.values()))


def refuse_other_wrappers(params: Sequence[Tensor]) -> None:
    """Refuse DeepSpeed ZeRO-3's partitioned parameters (they carry ``ds_id``)."""
    for p in params:
        if hasattr(p, "ds_id"):
            raise UnsupportedShardingError(
                "these parameters are partitioned by DeepSpeed ZeRO-3 (a parameter carries ds_id), "
                "which gathers them into other tensors only inside its own hooks, so forward "
                "gradients cannot key tangents on them: use DeepSpeed ZeRO stage 0-2 (parameters "
                f"whole on each rank, with reduce=), or shard with {_FSDP2}."
            )


def _refuse_dtensor(p) -> None:
    raise UnsupportedShardingError(
        f"a parameter of shape {tuple(p.shape)} is a DTensor with placements {tuple(p.placements)} "
        f"on a mesh of shape {tuple(p.device_mesh.shape)} that FSDP2 does not manage (tensor "
        "parallelism: parallelize_module or distribute_tensor): forward gradients support "
        f"parameters sharded by {_FSDP2} alone; apply fully_shard without tensor parallelism."
    )


def _check_fsdp2(p, record: _Record) -> None:
    from torch.distributed.tensor import Shard

    if record.nested_dtensor or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise UnsupportedShardingError(
            f"a parameter of shape {tuple(p.shape)} is sharded by FSDP2 with placements "
            f"{tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}"
            + (" over a tensor-parallel DTensor" if record.nested_dtensor else "")
            + ": forward gradients handle FSDP2's default, Shard(0) on a 1-D mesh, alone; "
            "drop shard_placement_fn, HSDP's 2-D mesh and tensor parallelism."
        )
    if record.offload:
        raise UnsupportedShardingError(
            "FSDP2 offloads these parameters to the CPU (offload_policy=CPUOffloadPolicy()), which "
            "forward gradients do not support: drop offload_policy; a forward-gradient step holds "
            "no gradients or optimizer state for offloading to save (use ForwardSGD)."
        )


def refuse_sharded(params: Sequence[Tensor], where: str) -> None:
    """Refuse sharded or partitioned parameters handed to ``where``, a function that runs the
    closure with the tensors it is given: FSDP2 computes with gathered tensors, not with the
    shards, so their directional derivative would be a silent zero."""
    for p in params:
        if _is_dtensor(p) or hasattr(p, "ds_id"):
            raise UnsupportedShardingError(
                f"{where} was given a sharded parameter (shape {tuple(p.shape)}, "
                f"{type(p).__name__}), which the model does not compute with (FSDP gathers it into "
                "another tensor during the forward pass), so its directional derivative would be "
                "zero: use ForwardGradient, ForwardSGD or ForwardGradientEstimator, which map "
                f"{_FSDP2} shards to the gathered parameters."
            )
