"""A context-parallel launcher: ring attention over ``torch.distributed`` for any definition
whose loop has a derivable combine (``passes/context_parallel.py``).

Every process holds a shard of the queries and of the keys and values (any lengths, one
shard per rank in rank order: rank ``r`` holds positions ``offset_r .. offset_r + n_r``).
The key shards travel around the ring; at each of the ``world`` steps a process computes the
partial states of its queries against the key shard it holds (at global positions, so causal
masks, windows, ALiBi and document masks stay exact), merges them into its running state with
the derived combine, and passes the shard on — the next shard's transfer overlaps the local
partial.  After the last step it finishes its queries' outputs::

    cp = attnc.backends.context_parallel.compile_context_parallel(spec, "causal_softmax")
    AV_local = cp(Q_local, K_local, V_local)          # in every process of the group

With ``layout="zigzag"`` each process holds two opposite chunks of the sequence (chunks
``r`` and ``2W - 1 - r`` of ``2W``, as zig-zag ring attention does), so a causal mask gives
every process the same work; each (query chunk, key chunk) pair is one partial at its
global positions, and a pair that is fully masked costs only its tile-range check.

The partial (the loop over a key shard) comes from any backend.  The merge of two states
(``ShardedForm.pair_merge``: the derived combine with its stacking rank written out) and the
finish are loop-less maps, O(rows) per step, compiled with the same backend: on Triton or
CUDA they run on the states' device, so nothing goes through the host.  Where the backend
refuses them (``merge_on`` says why), they run on the host with numpy.
Backward over the ring waits for the derived backward (issue 12): ``requires_grad`` inputs
are refused.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..einsum_ir.ir import Definition, Module
from ..passes.context_parallel import ShardedForm, offset_param, sharded_form, total_param


@dataclass
class ContextParallel:
    """The launcher of one definition's :class:`ShardedForm` (see the module docstring)."""

    form: ShardedForm
    partial: Any
    merge: Any
    finish: Any
    runtime: str              # "numpy" or "torch": what the partial function takes
    merge_on: str = "numpy"   # where merge and finish run: the backend's name, or "numpy
                              # (host): <why the backend refused them>"

    def __call__(self, *args, group=None, layout: str = "contiguous", **params):
        """The definition's outputs for this process's queries (its shard of them, in the
        order it holds them), from the key shards of every process of ``group``.

        ``layout``: how the sequence is split over the processes.  ``"contiguous"``: rank
        ``r`` holds one run of positions, after rank ``r - 1``'s (any lengths).
        ``"zigzag"``: the sequence is cut into ``2 * world`` chunks (``torch.tensor_split``'s
        lengths) and rank ``r`` holds chunks ``r`` and ``2 * world - 1 - r``, concatenated
        (:func:`zigzag_shard` makes them): under a causal mask every rank then has the same
        work, where contiguous shards leave the last rank with ``2 * world - 1`` times the
        first's."""
        import torch
        import torch.distributed as dist

        form = self.form
        names = [a.name for a in form.source.tensor_args]
        if len(args) != len(names):
            raise TypeError(f"{form.source.name}: expected {len(names)} tensors "
                            f"({', '.join(names)}), got {len(args)}")
        if layout not in ("contiguous", "zigzag"):
            raise ValueError(f"layout={layout!r}: use 'contiguous' or 'zigzag'")
        named = dict(zip(names, args))
        for n, x in named.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"argument '{n}' must be a torch.Tensor, got {type(x).__name__}")
            if x.requires_grad:
                raise NotImplementedError(
                    f"argument '{n}' requires grad: the backward over the ring needs the "
                    f"derived backward (issue 12), not there yet")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        keys = self._lengths(named, form.key_inputs, form.keys, group, world)
        key_pieces = _pieces(keys, layout, form.key_inputs[0], form.keys)
        if form.queries:
            queries = self._lengths(named, form.query_inputs, form.queries, group, world)
            query_pieces = _pieces(queries, layout, form.query_inputs[0], form.queries)[rank]
            params[total_param(form.queries)] = float(sum(queries))
        else:
            query_pieces = [(0, None)]  # every process holds every query
        params[total_param(form.keys)] = float(sum(keys))
        self._global_defaults(named, params)
        rows = [self._piece(named, form.query_inputs, form.queries, at, n)
                for at, n in _local_spans(query_pieces)]
        block = {n: named[n] for n in form.key_inputs}
        states = [None] * len(rows)
        for step in range(world):
            source = (rank - step) % world
            pending = self._pass_on(block, keys[(source - 1) % world], rank, world, group) \
                if step < world - 1 else None
            for (k_at, k_n), (k_offset, _) in zip(_local_spans(key_pieces[source]),
                                                  key_pieces[source]):
                shard = self._piece(block, form.key_inputs, form.keys, k_at, k_n)
                for i, ((q_offset, _), piece) in enumerate(zip(query_pieces, rows)):
                    local = dict(params, **{offset_param(form.keys): float(k_offset)})
                    if form.queries:
                        local[offset_param(form.queries)] = float(q_offset)
                    part = self._call(self.partial, form.partial, dict(piece, **shard), local)
                    states[i] = part if states[i] is None else self._merge(states[i], part,
                                                                           piece, params)
            if pending is not None:
                for work in pending[0]:
                    work.wait()
                block = pending[1]
        outs = [self._call(self.finish, form.finish,
                           dict(piece, **dict(zip(form.states, state))), params)
                for piece, state in zip(rows, states)]
        out = tuple(self._joined([o[k] for o in outs], o_def)
                    for k, o_def in enumerate(form.source.outputs))
        return out[0] if len(out) == 1 else out

    def _piece(self, named: dict, inputs, rank_name, start: int, length) -> dict:
        """``named`` with ``inputs`` narrowed to ``start .. start + length`` along
        ``rank_name`` (``length`` None: as they are)."""
        if length is None:
            return dict(named)
        out = dict(named)
        for a in self.form.source.tensor_args:
            if a.name in inputs and a.name in named:
                x = named[a.name]
                out[a.name] = x.narrow(x.dim() - len(a.ranks) + a.ranks.index(rank_name),
                                       start, length)
        return out

    def _joined(self, pieces: list, out) -> Any:
        """An output's pieces (one per query piece) in the order the process holds them."""
        import torch

        if len(pieces) == 1:
            return pieces[0]
        ranks = out.ranks
        dim = pieces[0].dim() - len(ranks) + ranks.index(self.form.queries)
        return torch.cat(pieces, dim=dim)

    # --- the merge API (FlashInfer's merge_state, derived) ---------------------------------
    def states(self, *args, key_offset: int = 0, key_total: int | None = None,
               query_offset: int = 0, query_total: int | None = None, **params) -> tuple:
        """The partial states of these queries against these keys, which sit at positions
        ``key_offset ..`` of a sequence of ``key_total`` keys (default: just these)."""
        form = self.form
        named = dict(zip([a.name for a in form.source.tensor_args], args))
        keys = self._local_length(named, form.key_inputs, form.keys)
        params[offset_param(form.keys)] = float(key_offset)
        params[total_param(form.keys)] = float(keys if key_total is None else key_total)
        if form.queries:
            rows = self._local_length(named, form.query_inputs, form.queries)
            params[offset_param(form.queries)] = float(query_offset)
            params[total_param(form.queries)] = float(rows if query_total is None else query_total)
        self._global_defaults(named, params)
        return self._call(self.partial, form.partial, named, params)

    def merge_states(self, *states: tuple, **params) -> tuple:
        """One state from several (each a tuple from :meth:`states` or this method)."""
        out = states[0]
        for s in states[1:]:
            out = self._merge(out, s, {}, params)
        return out

    def finish_states(self, states: tuple, *args, key_total: int | None = None,
                      query_total: int | None = None, **params):
        """The definition's outputs from a (merged) state; ``args`` are the definition's
        inputs for what the finish reads besides the state (a query norm)."""
        form = self.form
        named = dict(zip([a.name for a in form.source.tensor_args], args))
        named.update(zip(form.states, states))
        if key_total is not None:
            params[total_param(form.keys)] = float(key_total)
        if form.queries and query_total is not None:
            params[total_param(form.queries)] = float(query_total)
        out = self._call(self.finish, form.finish, named, params)
        return out[0] if len(out) == 1 else out

    def _local_length(self, named, inputs, rank_name) -> int:
        a = next(x for x in self.form.source.tensor_args if x.name == inputs[0])
        x = named[a.name]
        return x.shape[x.dim() - len(a.ranks) + a.ranks.index(rank_name)]

    # --- pieces ---------------------------------------------------------------------------
    def _global_defaults(self, named, params) -> None:
        """Defaults over a sharded rank's size (``bias = -log(M)``), at the global sizes."""
        import sympy

        form = self.form
        totals = {form.keys: params[total_param(form.keys)]}
        if form.queries:
            totals[form.queries] = params[total_param(form.queries)]
        for p in form.source.scalar_params:
            if p.default is None or p.name in params or not (
                    {s.name for s in p.default.free_symbols} & set(totals)):
                continue
            sizes = {}
            for a in form.source.tensor_args:
                x = named[a.name]
                for k, r in enumerate(a.ranks):
                    sizes[r] = x.shape[x.dim() - len(a.ranks) + k]
            sizes.update(totals)
            value = p.default.subs({s: sizes[s.name] for s in p.default.free_symbols})
            params[p.name] = float(sympy.N(value))


    def _lengths(self, named, inputs, rank_name, group, world) -> list[int]:
        """Every process's shard length along ``rank_name`` (all-gathered)."""
        import torch
        import torch.distributed as dist

        a = next(x for x in self.form.source.tensor_args if x.name == inputs[0])
        x = named[a.name]
        local = x.shape[x.dim() - len(a.ranks) + a.ranks.index(rank_name)]
        for n in inputs[1:]:
            b = next(y for y in self.form.source.tensor_args if y.name == n)
            y = named[n]
            if y.shape[y.dim() - len(b.ranks) + b.ranks.index(rank_name)] != local:
                raise ValueError(f"argument '{n}': its shard along {rank_name} has another "
                                 f"length than '{a.name}''s ({local})")
        out = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
        dist.all_gather(out, torch.tensor([local], dtype=torch.int64, device=x.device),
                        group=group)  # (on the inputs' device: NCCL takes no CPU tensor)
        return [int(t.item()) for t in out]

    def _pass_on(self, block, incoming: int, rank: int, world: int, group):
        """Send this key shard to the next rank, receive the previous rank's (async)."""
        import torch
        import torch.distributed as dist

        works, received = [], {}
        for a in self.form.source.tensor_args:
            if a.name not in block:
                continue
            x = block[a.name].contiguous()
            shape = list(x.shape)
            shape[x.dim() - len(a.ranks) + a.ranks.index(self.form.keys)] = incoming
            buf = torch.empty(shape, dtype=x.dtype, device=x.device)
            peer_next = dist.get_global_rank(group, (rank + 1) % world) if group else (rank + 1) % world
            peer_prev = dist.get_global_rank(group, (rank - 1) % world) if group else (rank - 1) % world
            works.append(dist.isend(x, peer_next, group=group))
            works.append(dist.irecv(buf, peer_prev, group=group))
            received[a.name] = buf
        return works, received

    def _call(self, fn, defn: Definition, named: dict, params: dict) -> tuple:
        import torch

        args = [named[a.name] for a in defn.tensor_args]
        kwargs = {p.name: params[p.name] for p in defn.scalar_params if p.name in params}
        if self.runtime == "numpy" or (defn is not self.form.partial and self.merge_on.startswith(
                "numpy")):
            device = args[0].device if args else torch.device("cpu")
            out = fn(*[a.detach().cpu().numpy() for a in args], **kwargs)  # on the host
            out = out if isinstance(out, tuple) else (out,)
            return tuple(torch.from_numpy(o).to(device) for o in out)
        out = fn(*args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    def _merge(self, states, part, named, params) -> tuple:
        import torch

        from ..passes.unroll import unrolled_name

        pair = self.form.pair_merge
        merged = dict(named)
        for name, a, b in zip(self.form.states, states, part):
            a, b = torch.broadcast_tensors(a, b)
            if pair is not None:  # the two states as they are
                merged[unrolled_name(name, 0)], merged[unrolled_name(name, 1)] = a, b
                continue
            ncore = len(next(x for x in self.form.merge.tensor_args if x.name == name).ranks) - 1
            merged[name] = torch.stack([a, b], dim=a.dim() - ncore)
        return self._call(self.merge, self.form.merge if pair is None else pair, merged, params)


def _zigzag_chunks(total: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) of the ``2 * world`` chunks of ``total`` positions, with
    ``torch.tensor_split``'s lengths (the first ``total % (2 * world)`` one longer)."""
    n = 2 * world
    lengths = [total // n + (1 if i < total % n else 0) for i in range(n)]
    offsets = [sum(lengths[:i]) for i in range(n)]
    return list(zip(offsets, lengths))


def _pieces(lengths: list[int], layout: str, arg: str, rank_name: str) -> list[list[tuple]]:
    """Per process, the (global offset, length) of each run of positions it holds, in the
    order it holds them."""
    world = len(lengths)
    if layout == "contiguous":
        return [[(sum(lengths[:r]), lengths[r])] for r in range(world)]
    chunks = _zigzag_chunks(sum(lengths), world)
    out = []
    for r in range(world):
        mine = [chunks[r], chunks[2 * world - 1 - r]]
        if lengths[r] != mine[0][1] + mine[1][1]:
            raise ValueError(
                f"argument '{arg}': rank {r} holds {lengths[r]} positions along {rank_name}, "
                f"but a zig-zag shard of {sum(lengths)} over {world} processes has "
                f"{mine[0][1] + mine[1][1]} (chunks {r} and {2 * world - 1 - r}: make it with "
                f"zigzag_shard)")
        out.append(mine)
    return out


def _local_spans(pieces: list[tuple]) -> list[tuple[int, int]]:
    """(start, length) of each piece within the tensor that holds them end to end."""
    spans, at = [], 0
    for _, n in pieces:
        spans.append((at, n))
        at += n or 0
    return spans


def zigzag_shard(x, dim: int, rank: int, world: int):
    """Rank ``rank``'s zig-zag shard of ``x`` along ``dim``: chunks ``rank`` and
    ``2 * world - 1 - rank`` of ``torch.tensor_split(x, 2 * world, dim)``, concatenated."""
    import torch

    chunks = torch.tensor_split(x, 2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: list, dim: int):
    """The whole tensor from every rank's zig-zag shard (rank order), along ``dim``."""
    import torch

    world = len(shards)
    total = sum(s.shape[dim] for s in shards)
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        first = _zigzag_chunks(total, world)[r][1]
        chunks[r], chunks[2 * world - 1 - r] = s.narrow(dim, 0, first), s.narrow(
            dim, first, s.shape[dim] - first)
    return torch.cat(chunks, dim=dim)


def compile_context_parallel(spec: str | Path | Module, name: str | None = None,
                             backend: str = "numpy", directory: str | Path | None = None,
                             **options) -> ContextParallel:
    """Compile definition ``name`` (default: the first) of a spec for the ring: its partial,
    merge and finish functions with ``backend``, written under ``directory`` (a temporary
    one by default) and imported.  Refuses a definition without a derivable combine."""
    from ..frontends import parse
    from ..frontends.api import _spec_text
    from ..passes.tile import NotTileable
    from . import compile_module, get_backend, load_generated, write_atomic

    module = spec if isinstance(spec, Module) else parse(*_spec_text(spec))
    defn = module.definitions[0] if name is None else module[name]
    runtime = get_backend(backend).runtime
    form = sharded_form(defn, {"tile": options.get("tile", 64)},
                        state_dtype=None if runtime == "numpy" else "f32")
    out = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="attnc_cp_"))

    def build(definitions, on: str, stem: str):
        _, files = compile_module(Module(definitions), on, stem, names=[], options=dict(options))
        for file, text in files.items():
            write_atomic(out / file, text)
        return load_generated(out / f"{stem}.py")

    # the partial (the loop over the key shard) on the backend; the merge of two states and
    # the finish, O(rows) per step and loop-less, on the backend too where it takes them
    partial = build((form.partial,), backend, f"{defn.name}_cp_partial")
    merge_on, why = backend, form.pair_merge_refused
    if form.pair_merge is not None:
        try:
            maps = build((form.pair_merge, form.finish), backend, f"{defn.name}_cp_merge")
        except NotTileable as err:
            why = str(err)
    if why is not None:
        merge_on = f"numpy (host): {why}"
        maps = build((form.pair_merge or form.merge, form.finish), "numpy",
                     f"{defn.name}_cp_merge")
    merge = form.pair_merge or form.merge
    return ContextParallel(form, getattr(partial, form.partial.name), getattr(maps, merge.name),
                           getattr(maps, form.finish.name), runtime, merge_on)
