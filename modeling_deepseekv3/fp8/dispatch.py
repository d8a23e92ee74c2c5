"""How an FP8 weight is multiplied, decided in one place: :func:`choose_backend`.

Every FP8 matmul in the package -- a plain :class:`~.linear.FP8Linear`, the absorbed attention's per-head
products on ``kv_b_proj``, the routed experts' grouped kernel, and the model-level report
(:func:`~.linear.fp8_backends`) -- asks :func:`choose_backend` and does what it says. Before, each of them re-derived
part of the answer (the device policy here, the shape checks there, the autograd and offload conditions
somewhere else), and the pieces could drift apart; now a rule changes in one function.

The answer depends on three things, checked in this order:

1. per call (only when the caller passes this call's input ``x``): autograd recording, an empty input, an
   input dtype or device the kernel does not take, an offloaded Accelerate hook;
2. per device (:func:`device_backend`): what the requested mode (the config's ``fp8_compute``) means where
   the weight lives; "auto" picks, an explicit backend the device cannot run raises :class:`FP8BackendError`;
3. per weight: a kernel that does not take this weight's shape, dtype or layout means ``"dequant"``.

Backends, each in a file named for it: ``"native"`` (:mod:`.cpu`, the C++ kernels of :mod:`.native`),
``"scaled_mm"`` (:mod:`.scaled_mm`, Hopper), ``"w8a16"`` (:mod:`.w8a16`, Triton on any CUDA GPU), and
``"dequant"`` (dequantize, then ``F.linear``: the reference). This module imports only torch and its own
package, so the backend files never depend on the model.
"""

from __future__ import annotations

import functools

import torch

from . import cpu, scaled_mm, w8a16

__all__ = ["FP8_COMPUTE_MODES", "KINDS", "FP8BackendError", "choose_backend", "device_backend"]

#: The values of ``fp8_compute``: "auto" picks per device (:func:`device_backend`), the others name a backend.
FP8_COMPUTE_MODES = ("auto", "dequant", "native", "scaled_mm", "w8a16")
#: What a caller of :func:`choose_backend` is about to compute (its docstring lists the answers of each).
KINDS = ("linear", "heads", "dense", "grouped")
_GPU_KERNELS = ("scaled_mm", "w8a16")
_CPU_NATIVE = ("auto", "native")


class FP8BackendError(ValueError):
    """An ``fp8_compute`` backend was asked for on a device that cannot run it."""


def choose_backend(
    mode: str,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    x: torch.Tensor | None = None,
    *,
    kind: str = "linear",
    module=None,
) -> str:
    """The backend for multiplying by this FP8 ``weight`` (with ``scale_inv``, ``block_size``) under ``mode``.

    ``x``: this call's input, for the per-call conditions; None asks for inference in general (what a report
    shows). ``module``: the module holding the weight, read only for an Accelerate offload hook (``heads`` and
    ``dense``). Raises :class:`FP8BackendError` where ``mode`` names a backend the weight's device cannot run,
    except for calls recording autograd, which never reach a kernel. The answers, by ``kind``:

    * ``"linear"`` (``y = x W^T``): ``"autograd"`` (``x`` requires grad with grad mode on: the autograd
      function that re-dequantizes in the backward), ``"native"``, ``"scaled_mm"``, ``"w8a16"``, or
      ``"dequant"`` (requested, an empty input, or the chosen kernel does not take this input or weight).
    * ``"heads"`` (the absorbed MLA's per-head products on ``kv_b_proj``): ``"native"`` (the CPU head kernels;
      not for an offloaded module, whose weights are only borrowed for the call), else the ``"dense"`` answer.
    * ``"dense"`` (a dequantized copy of the weight for the caller's own matmuls): ``"dense"`` (keep the copy
      and reuse it while the FP8 tensors are unchanged) or ``"dequant"`` (dequantize per call: requested,
      grad mode on, or offloaded weights).
    * ``"grouped"`` (``weight``: one routed expert's, standing for its stacked layer): ``"w8a16_grouped"``
      (the grouped W8A16 kernel, on a CUDA device that resolves to a GPU backend, with Triton, and for ``x``
      only in inference on the weight's device) or ``"modules"`` (each expert's module chooses as a linear).
    """
    if kind == "linear":
        return _linear(mode, weight, scale_inv, block_size, x)
    if kind == "heads":
        return _heads(mode, weight, scale_inv, block_size, x, module)
    if kind == "dense":
        return _dense(mode, weight, module)
    if kind == "grouped":
        return _grouped(mode, weight, block_size, x)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def _linear(mode, weight, scale_inv, block_size, x) -> str:
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        return "autograd"
    backend = device_backend(mode, weight.device)
    if backend == "dequant":
        return backend
    if x is not None:
        if not x.numel():
            return "dequant"
        if backend == "native":
            takes_input = x.is_cpu and x.dtype in cpu.INPUT_DTYPES
        else:
            dtypes = scaled_mm.INPUT_DTYPES if backend == "scaled_mm" else w8a16.INPUT_DTYPES
            takes_input = x.dtype in dtypes and x.device == weight.device
        if not takes_input:
            return "dequant"
    if backend == "native":
        takes_weight = cpu.native_weight_applies(weight, scale_inv, block_size)
    elif backend == "scaled_mm":
        takes_weight = scaled_mm.scaled_mm_weight_applies(weight, block_size)
    else:
        takes_weight = w8a16.w8a16_weight_applies(weight, block_size)
    return backend if takes_weight else "dequant"


def _heads(mode, weight, scale_inv, block_size, x, module) -> str:
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        return "dequant"
    if (
        device_backend(mode, weight.device) == "native"
        and not _offloaded(module)
        and (x is None or (x.is_cpu and x.dtype in cpu.INPUT_DTYPES))
        and cpu.native_weight_applies(weight, scale_inv, block_size)
    ):
        return "native"
    return _dense(mode, weight, module)


def _dense(mode, weight, module) -> str:
    # an explicit "dequant" is the reference and keeps nothing; "auto" resolving to "dequant" (a device without
    # kernels) still keeps the copy, since dequantizing per decoded token is what makes those devices slow
    if torch.is_grad_enabled() or mode == "dequant" or _offloaded(module):
        return "dequant"
    device_backend(mode, weight.device)  # a mode this device cannot run fails here as in the forward
    return "dense"


def _grouped(mode, weight, block_size, x) -> str:
    if x is not None and (torch.is_grad_enabled() or x.device != weight.device or x.dtype not in w8a16.INPUT_DTYPES):
        return "modules"
    if (
        device_backend(mode, weight.device) in _GPU_KERNELS  # the grouped kernel is W8A16 for both: a grouped
        and w8a16.triton_available()  # block-scaled FP8 x FP8 GEMM for Hopper is not written yet
        and w8a16.w8a16_weight_applies(weight, block_size)
    ):
        return "w8a16_grouped"
    return "modules"


def _offloaded(module) -> bool:
    return bool(getattr(getattr(module, "_hf_hook", None), "offload", False))


# ------------------------------------------------------------------------------------------- device policy
def device_backend(mode: str, device: torch.device | str) -> str:
    """What ``fp8_compute=mode`` means for FP8 weights on ``device``, before any shape is looked at.

    ``"auto"``: CPU -> ``"native"`` (the C++ kernels; where they cannot be built, :func:`choose_backend`
    answers ``"dequant"`` by the weight check); CUDA SM90 with CUDA >= 12.9 -> ``"scaled_mm"``; any other
    CUDA GPU with Triton installed -> ``"w8a16"``; everything else -> ``"dequant"``. An explicit backend on a
    device that cannot run it raises :class:`FP8BackendError` naming the device and what to set instead.
    Called on every FP8 matmul: the CPU answer is a tuple lookup, the others are cached per device."""
    if mode in _CPU_NATIVE and getattr(device, "type", None) == "cpu":
        return "native"
    device = torch.device(device)
    return _device_policy(mode, device.type, device.index)


@functools.cache
def _device_policy(mode: str, device_type: str, index: int | None) -> str:
    if mode not in FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute must be one of {FP8_COMPUTE_MODES}, got {mode!r}.")
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    is_cuda = device_type == "cuda" and torch.cuda.is_available()
    if mode == "auto":
        if device_type == "cpu":
            return "native"
        if is_cuda and scaled_mm.scaled_mm_supported(device):
            return "scaled_mm"
        if is_cuda and w8a16.triton_available():
            return "w8a16"
        return "dequant"
    if mode == "native" and device_type != "cpu":
        raise FP8BackendError(
            f"fp8_compute='native' is the CPU kernel, but the FP8 weights are on {_describe(device)}. "
            "Set fp8_compute='auto' (picks the best backend per device) or 'dequant'."
        )
    if mode == "scaled_mm" and not scaled_mm.scaled_mm_supported(device):
        raise FP8BackendError(
            f"fp8_compute='scaled_mm' needs torch's block-scaled FP8 GEMM (a Hopper GPU, compute capability 9.x, "
            f"with CUDA >= 12.9), but the FP8 weights are on {_describe(device)}. Set fp8_compute='auto', or "
            "'w8a16' on other CUDA GPUs (needs triton), 'native' on CPU, or 'dequant' anywhere."
        )
    if mode == "w8a16" and not (is_cuda and w8a16.triton_available()):
        why = (
            "triton is not installed (pip install triton)" if is_cuda else f"the FP8 weights are on {_describe(device)}"
        )
        raise FP8BackendError(
            f"fp8_compute='w8a16' is a Triton kernel for CUDA GPUs, but {why}. Set fp8_compute='auto', "
            "'native' on CPU, or 'dequant' anywhere."
        )
    return mode


def _describe(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {device}"
    major, minor = scaled_mm.cuda_capability(device)
    name = torch.cuda.get_device_name(device)
    return f"{device} ({name}, compute capability {major}.{minor}, CUDA {torch.version.cuda})"
