"""The routed experts of one MoE layer, run over rows sorted by expert.

Shape-suffix legend: A = assignments (rows, sorted by expert), D = hidden size, I = expert width,
E = routed experts.

Every expert is its own module (``mlp.experts.E.{gate,up,down}_proj``): checkpoint keys load 1:1 and
zero-copy, Accelerate places and offloads single experts, PEFT and bitsandbytes see plain linears. Three
ways to run them, chosen per call, all equal to :func:`~.reference.moe_reference`:

* **modules**: each active expert's module on its slice. Honours FP8 weights, PEFT wrappers, Accelerate
  hooks, experts on other devices, and autograd. The reference-shaped path.
* **plain**: dense, hook-free experts during inference: only the matmuls run per expert (written into
  shared buffers); the activation and gating run once over all rows.
* **plain fp8**: FP8 experts on the CPU kernels during inference: all active experts' products and SwiGLUs in one
  native call (:func:`~...fp8.linear.fp8_native_experts`; per product with another activation), the same ops the
  modules would run -- bit-identical to them -- without ~20 us of module and dispatch Python per projection (at
  decode, Moonlight's 26 MoE layers x 18 projections: 6-12 ms per token, 4-7% of the step).
* **grouped**: dense experts during inference, after the layer's first call re-homes their weights into two
  stacked buffers (``gate_up [E, 2I, D]``, ``down [E, D, I]``): two grouped matmuls per layer. Each
  expert's parameters keep their identity and names; only their ``.data`` becomes a view into the stack,
  so optimizers, ``state_dict``, saving and autograd see nothing different (an optimizer step writes
  through the views into the stack).
* **fp8 grouped**: FP8 experts where :func:`~...fp8.dispatch.choose_backend` says ``"w8a16_grouped"`` (a CUDA
  GPU whose ``fp8_compute`` resolves to a GPU backend, inference): the same re-homing, kept in FP8 (``gate``,
  ``up`` ``[E, I, D]``, ``down [E, D, I]`` plus their block scales), then three launches of the grouped W8A16
  Triton kernel (:func:`~...fp8.linear.fp8_grouped_matmul`)
  over the experts that received rows: no per-expert Python loop, 1 byte per weight read. Stacking costs
  one layer's expert weights of transient memory, once.

Under ``torch.compile`` at inference the whole choice above runs as one opaque op,
``torch.ops.deepseekv3.routed_experts``: which experts received rows is data (the paths' one host sync), so a graph
cannot hold the loop, and a ``fullgraph=True`` decode step (a static cache, ``generate(compile_config=...)``) would
fail there. The op calls back into the eager paths by the layer's name (vLLM's ``moe_forward`` does the same), so
compiled and eager runs take the same path and give the same bits; everything around it (router, dispatch,
combine, attention, norms) is compiled. With autograd on, the eager code runs (a graph break).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ...fp8 import FP8Linear
from ...fp8 import dispatch as fp8_dispatch
from ...fp8.linear import fp8_grouped_matmul, fp8_native_experts, fp8_native_linear, fp8_native_takes
from ..layers import SwiGLUMLP

__all__ = ["RoutedExperts"]

# torch >= 2.8 ships a grouped matmul (a loop of GEMMs in C++ on CPU, one kernel on recent GPUs)
_GROUPED_MM = getattr(F, "grouped_mm", None)


class RoutedExperts(nn.ModuleList):
    """``mlp.experts``: ``n_routed_experts`` SwiGLU modules; ``forward(x_AD, counts_E) -> y_AD``."""

    def __init__(self, config):
        super().__init__(SwiGLUMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts))
        self.grouped = bool(config.moe_grouped_experts)
        # (gate_up [E, 2I, D], down [E, D, I], data_ptrs of each expert's three weights) once stacked
        self._stack: tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]] | None = None
        self._stack_tried = False
        # FP8: ((gate, up, down) float8 stacks, their scale stacks, data_ptrs of each expert's six tensors)
        self._fp8_stack = None
        self._fp8_stack_tried = False
        _COMPILED[_compiled_name(self)] = self

    def __setstate__(self, state) -> None:  # copies (deepcopy, pickle) are layers a graph may call too
        super().__setstate__(state)
        _COMPILED[_compiled_name(self)] = self

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_AD``: rows sorted by expert, ``counts_E[e]`` of them for expert ``e``."""
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return torch.ops.deepseekv3.routed_experts(x_AD, counts_E, _compiled_name(self))
        return self._forward_eager(x_AD, counts_E)

    def _forward_eager(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_AD.shape[0] == 0:
            return x_AD.new_zeros(0, x_AD.shape[-1])
        active = counts_E.nonzero().flatten().tolist()  # the one host sync
        inference = not torch.is_grad_enabled()  # also the no-grad first pass of reentrant checkpointing
        if self.fp8_grouped_backend(x=x_AD) is not None:
            if self._fp8_stack_intact(x_AD, active) or (not self._fp8_stack_tried and self.stack_fp8()):
                return self.run_fp8_grouped(x_AD, counts_E)
        if inference and self._grouped_allowed(x_AD):
            if self._stack_intact(x_AD, active) or (not self._stack_tried and self.stack()):
                return self._run_stacked(x_AD, counts_E)
        slices = list(zip(active, counts_E[active].tolist()))
        trios = self._plain_fp8_trios(x_AD, active) if inference else None
        if trios is not None:
            return self._run_plain_fp8(x_AD, slices, trios)
        if inference and all(_is_plain_expert(self[e], x_AD) for e in active):
            return self._run_plain(x_AD, slices)
        return self._run_modules(x_AD, slices)

    # -- per-expert paths ------------------------------------------------------------------------------
    def _run_modules(self, x_AD: torch.Tensor, slices) -> torch.Tensor:
        outs, start = [], 0
        for expert_id, count in slices:
            outs.append(self[expert_id](x_AD[start : start + count]).to(x_AD.device))
            start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run_plain(self, x_AD: torch.Tensor, slices) -> torch.Tensor:
        a = x_AD.shape[0]
        first = self[slices[0][0]]
        gate_AI = x_AD.new_empty(a, first.intermediate_size)
        up_AI = x_AD.new_empty(a, first.intermediate_size)
        start = 0
        for expert_id, count in slices:
            expert, rows = self[expert_id], slice(start, start + count)
            torch.mm(x_AD[rows], expert.gate_proj.weight.t(), out=gate_AI[rows])
            torch.mm(x_AD[rows], expert.up_proj.weight.t(), out=up_AI[rows])
            start += count
        h_AI = first.act_fn(gate_AI).mul_(up_AI)
        y_AD = x_AD.new_empty(a, x_AD.shape[1])
        start = 0
        for expert_id, count in slices:
            rows = slice(start, start + count)
            torch.mm(h_AI[rows], self[expert_id].down_proj.weight.t(), out=y_AD[rows])
            start += count
        return y_AD

    def _plain_fp8_trios(self, x: torch.Tensor, active: list[int]) -> list[FP8Linear] | None:
        """The active experts' projections, ``(gate, up, down)`` per expert in ``active``'s order, when every active
        expert is a plain FP8 trio (no hooks, no wrappers) whose products the CPU kernels run: the ``"linear"``
        backend for this input is ``"native"`` (asked once, of the first expert: the per-call part of the answer is
        the input's) and each weight is one the kernels read. Else None. Runs per layer and decode step: modules
        are read from their own dicts (``ModuleList`` indexing and ``Module.__getattr__`` cost ~1 us a lookup)."""
        experts = self._modules
        probe = experts[str(active[0])]._modules["gate_proj"]
        if not isinstance(probe, FP8Linear):
            return None
        if (
            fp8_dispatch.choose_backend(probe.compute, probe.weight, probe.weight_scale_inv, probe.block_size, x)
            != "native"
        ):
            return None
        trios = []
        for e in active:
            projs = _plain_fp8_trio(experts[str(e)], probe)
            if projs is None:
                return None
            for proj in projs:
                params = proj._parameters
                if proj.compute != probe.compute or not fp8_native_takes(
                    params["weight"], params["weight_scale_inv"], proj.block_size
                ):
                    return None
            trios += projs
        return trios

    def _run_plain_fp8(self, x_AD: torch.Tensor, slices, trios: list[FP8Linear]) -> torch.Tensor:
        """``trios``: :meth:`_plain_fp8_trios`' answer for the experts of ``slices``."""
        acts = [self._modules[str(e)]._modules["act_fn"] for e, _ in slices]
        if all(type(act) is nn.SiLU and not _hooked(act) for act in acts):
            # the products and the SwiGLU between them in one native call (what they are below, bit for bit)
            return fp8_native_experts(
                x_AD,
                [count for _, count in slices],
                [p._parameters["weight"] for p in trios],
                [p._parameters["weight_scale_inv"] for p in trios],
                trios[0].block_size,
            )  # (A, D)
        outs, start = [], 0
        for i, (_, count) in enumerate(slices):
            x = x_AD[start : start + count]
            g, u, d = trios[3 * i : 3 * i + 3]
            gate = fp8_native_linear(x, g.weight, g.weight_scale_inv, g.block_size)
            up = fp8_native_linear(x, u.weight, u.weight_scale_inv, u.block_size)
            outs.append(fp8_native_linear(acts[i](gate) * up, d.weight, d.weight_scale_inv, d.block_size))
            start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]  # (A, D)

    # -- grouped path ----------------------------------------------------------------------------------
    def _grouped_allowed(self, x: torch.Tensor) -> bool:
        if not self.grouped or _GROUPED_MM is None:
            return False
        # inductor lowers torch._grouped_mm on CPU for BF16 only; under torch.compile other dtypes take the
        # plain path (eager grouped_mm handles FP32 fine)
        return not (torch.compiler.is_compiling() and x.dtype != torch.bfloat16)

    @torch.no_grad()
    def stack(self) -> bool:
        """Re-home the dense expert weights into the two stacked buffers (module docstring). Returns False
        and changes nothing unless every expert is a dense, hook-free ``nn.Linear`` trio on one device.
        Tried automatically on the first inference call and again after the stack went stale (weights moved
        or replaced); a failed attempt is not retried."""
        self._stack_tried = True
        self._stack = None
        probe = self[0].gate_proj.weight
        if _GROUPED_MM is None or probe.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if not all(_is_plain_expert(e, probe) for e in self):
            return False
        n, inter, hidden = len(self), self[0].intermediate_size, self[0].hidden_size
        gate_up = probe.new_empty(n, 2 * inter, hidden)
        down = probe.new_empty(n, hidden, inter)
        ptrs = []
        for i, e in enumerate(self):
            gate_up[i, :inter].copy_(e.gate_proj.weight)
            gate_up[i, inter:].copy_(e.up_proj.weight)
            down[i].copy_(e.down_proj.weight)
            e.gate_proj.weight.data = gate_up[i, :inter]
            e.up_proj.weight.data = gate_up[i, inter:]
            e.down_proj.weight.data = down[i]
            ptrs.append((e.gate_proj.weight.data_ptr(), e.up_proj.weight.data_ptr(), e.down_proj.weight.data_ptr()))
        self._stack = (gate_up, down, ptrs)
        return True

    def _stack_intact(self, x: torch.Tensor, active: list[int]) -> bool:
        """Stacked, and the active experts' weights still live in the stack: a replaced module (PEFT), a
        hook (Accelerate) or moved weights (``.to()``) end the stacking. Inactive experts are not read."""
        if self._stack is None:
            return False
        gate_up, _, ptrs = self._stack
        if gate_up.device != x.device or gate_up.dtype != x.dtype:
            self._stack, self._stack_tried = None, False
            return False
        for e in active:
            expert = self[e]
            g, u, d = (expert.gate_proj, expert.up_proj, expert.down_proj)
            if (
                type(g) is not nn.Linear
                or type(u) is not nn.Linear
                or type(d) is not nn.Linear
                or (g.weight.data_ptr(), u.weight.data_ptr(), d.weight.data_ptr()) != ptrs[e]
                or expert._forward_pre_hooks
                or g._forward_pre_hooks
                or d._forward_pre_hooks
            ):
                self._stack, self._stack_tried = None, False
                return False
        return True

    def _run_stacked(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate_up, down, _ = self._stack
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        inter = down.shape[-1]
        h = _GROUPED_MM(x_AD, gate_up.transpose(1, 2), offs=offsets)  # (A, 2I)
        h = self[0].act_fn(h[:, :inter]).mul_(h[:, inter:])  # (A, I)
        return _GROUPED_MM(h, down.transpose(1, 2), offs=offsets)  # (A, D)

    # -- FP8 grouped path -------------------------------------------------------------------------------
    def fp8_grouped_backend(self, device: torch.device | None = None, x: torch.Tensor | None = None) -> str | None:
        """``"w8a16_grouped"`` where the FP8 grouped path runs (module docstring), else None. This method only
        says whether grouping is possible at all (``moe_grouped_experts`` on, FP8 experts, on ``device`` or
        ``x``'s device when given); whether the grouped kernel runs is :func:`~...fp8.dispatch.choose_backend`'s
        ``"grouped"`` answer for the first expert's weight (``x``: this call's input, for the per-call
        conditions). :func:`~...fp8.dispatch.fp8_backends` calls this without arguments for its report."""
        if not self.grouped:  # (expert parallelism turns grouping off: experts 0.. may be remote)
            return None
        probe = self[0].gate_proj
        if not isinstance(probe, FP8Linear):
            return None
        device = x.device if x is not None else device
        if device is not None and probe.weight.device != torch.device(device):
            return None
        backend = fp8_dispatch.choose_backend(
            probe.compute, probe.weight, probe.weight_scale_inv, probe.block_size, x, kind="grouped"
        )
        return backend if backend == "w8a16_grouped" else None

    @torch.no_grad()
    def stack_fp8(self) -> bool:
        """Re-home the FP8 expert weights and scales into stacks (FP8 kept; parameters become views, names and
        saving unchanged). Returns False and changes nothing unless every expert is a hook-free ``FP8Linear``
        trio without bias, all on one device with one block size. Tried once automatically; again only
        after the stack went stale."""
        self._fp8_stack_tried = True
        self._fp8_stack = None
        projs = ("gate_proj", "up_proj", "down_proj")
        first = self[0]
        if not all(_is_plain_fp8_expert(e, first.gate_proj) for e in self):
            return False
        codes, scales, ptrs = [], [], [[] for _ in self]
        for name in projs:
            ref = getattr(first, name)
            w_stack = ref.weight.new_empty(len(self), *ref.weight.shape)  # (E, N, K) float8
            s_stack = ref.weight_scale_inv.new_empty(len(self), *ref.weight_scale_inv.shape)  # (E, Nb, Kb)
            for i, expert in enumerate(self):
                proj = getattr(expert, name)
                w_stack[i].copy_(proj.weight)
                s_stack[i].copy_(proj.weight_scale_inv)
                proj.weight.data = w_stack[i]
                proj.weight_scale_inv.data = s_stack[i]
                ptrs[i] += [proj.weight.data_ptr(), proj.weight_scale_inv.data_ptr()]
            codes.append(w_stack)
            scales.append(s_stack)
        self._fp8_stack = (codes, scales, ptrs)
        return True

    def _fp8_stack_intact(self, x: torch.Tensor, active: list[int]) -> bool:
        if self._fp8_stack is None:
            return False
        codes, _, ptrs = self._fp8_stack
        if codes[0].device != x.device:
            self._fp8_stack, self._fp8_stack_tried = None, False
            return False
        for e in active:
            expert = self[e]
            if (
                not _is_plain_fp8_expert(expert, expert.gate_proj)
                or [
                    t.data_ptr()
                    for p in (expert.gate_proj, expert.up_proj, expert.down_proj)
                    for t in (p.weight, p.weight_scale_inv)
                ]
                != ptrs[e]
            ):
                self._fp8_stack, self._fp8_stack_tried = None, False
                return False
        return True

    def run_fp8_grouped(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The stacked FP8 experts on rows sorted by expert: three grouped W8A16 launches (any device the
        kernel runs on: CUDA, or CPU tensors under Triton's interpreter, which is how it is tested)."""
        (gate, up, down), (gate_s, up_s, down_s), _ = self._fp8_stack
        block = self[0].gate_proj.block_size
        g_AI = fp8_grouped_matmul(x_AD, gate, gate_s, counts_E, block)  # (A, I)
        u_AI = fp8_grouped_matmul(x_AD, up, up_s, counts_E, block)  # (A, I)
        h_AI = self[0].act_fn(g_AI).mul_(u_AI)
        return fp8_grouped_matmul(h_AI, down, down_s, counts_E, block)  # (A, D)


#: Every live layer by the name a compiled graph calls it in ``routed_experts`` (module docstring). Filled when a
#: layer is built or copied, not while tracing: dynamo would apply that write only after the graph's first run.
_COMPILED: weakref.WeakValueDictionary[str, RoutedExperts] = weakref.WeakValueDictionary()


def _compiled_name(experts: RoutedExperts) -> str:
    """Unique among live objects; dynamo guards a graph on the module's identity, so a graph never calls a name
    whose module is gone."""
    return f"experts@{id(experts):x}"


@torch.library.custom_op("deepseekv3::routed_experts", mutates_args=())
def _routed_experts_op(x_AD: torch.Tensor, counts_E: torch.Tensor, experts: str) -> torch.Tensor:
    """The eager experts of the layer registered as ``experts`` on rows sorted by expert -> ``[A, D]``."""
    module = _COMPILED.get(experts)
    if module is None:
        raise RuntimeError(f"The compiled graph calls routed experts {experts!r}, which no longer exist.")
    out = module._forward_eager(x_AD, counts_E)
    return out.clone() if out is x_AD else out  # (a custom op's output may not alias its input)


@_routed_experts_op.register_fake
def _(x_AD: torch.Tensor, counts_E: torch.Tensor, experts: str) -> torch.Tensor:
    return torch.empty_like(x_AD)  # (A, D): every expert maps the hidden size to itself


#: What a plain (unsharded) weight's type is: a sharded DTensor parameter is of DTensor's type instead.
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _hooked(module: nn.Module) -> bool:
    """Forward hooks of its own or an Accelerate hook (read from ``__dict__``: ``hasattr`` on a module costs an
    exception when the attribute is absent, and this runs per expert per decode step)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "_hf_hook" in module.__dict__


_TRIO = ("gate_proj", "up_proj", "down_proj")


def _plain_fp8_trio(expert: nn.Module, ref: FP8Linear) -> tuple[FP8Linear, FP8Linear, FP8Linear] | None:
    """``(gate, up, down)`` if they are three bias-free ``FP8Linear`` projections, no hooks of any kind, on ``ref``'s
    device with its block size; else None. Reads the modules' dicts (it runs per active expert per decode step)."""
    if _hooked(expert):
        return None
    device, block = ref.weight.device, ref.block_size
    mods = expert._modules
    projs = tuple(mods[name] for name in _TRIO)
    for proj in projs:
        if type(proj) is not FP8Linear or _hooked(proj) or proj.block_size != block:
            return None
        params = proj._parameters
        w = params["weight"]
        if params["bias"] is not None or type(w) not in _PLAIN_TENSORS or w.device != device or w.is_meta:
            return None  # (a sharded DTensor under tp_plan is not a plain tensor)
    return projs


def _is_plain_fp8_expert(expert: nn.Module, ref: FP8Linear) -> bool:
    """Three bias-free ``FP8Linear`` projections, no hooks of any kind, on ``ref``'s device with its block size."""
    return _plain_fp8_trio(expert, ref) is not None


def _is_plain_expert(expert: nn.Module, x: torch.Tensor) -> bool:
    """Dense ``nn.Linear`` projections on ``x``'s device and dtype, plain tensors (no subclass such as a sharded
    DTensor), no bias, no hooks of any kind."""
    if _hooked(expert):
        return False
    for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
        if type(proj) is not nn.Linear or proj.bias is not None or _hooked(proj):
            return False
        w = proj.weight
        if type(w) not in _PLAIN_TENSORS or w.device != x.device or w.dtype != x.dtype or w.is_meta:
            return False  # (a tensor subclass, a sharded DTensor under tp_plan: its module knows)
    return True
