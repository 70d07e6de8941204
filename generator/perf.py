"""Training fast path for the GPT: regional torch.compile and (selective) activation checkpointing.

    gpt = optimize_for_training(GPT.from_preset("GPT-XXL", ...), compile=True, checkpointing="selective")

Both act per transformer block, in place, so parameter names, state_dict keys, ZeRO / DDP wrapping and EMA are
unchanged: the trainer and bench/gpu_train.py call this before handing the model to the launcher.

checkpointing (activation memory vs recompute):
  "none"       keep every activation (fastest, most memory)
  "full"       recompute each whole block in backward (least memory, ~1/3 more FLOPs); the same as
               GPTConfig.grad_checkpointing=True
  "selective"  per-op policy inside each block: keep the outputs of the matmuls and of attention (the expensive
               ops), recompute norms, RoPE, SiLU/products and dropout masks (cheap, memory-bound ops)
  "alternate"  "full" on every other block (0, 2, 4, ...), none on the rest: about half the saving of "full"
               for half its recompute
compile: torch.compile each backbone block (and each AR-head block) on its own ("regional" compile: one small
graph compiled once and reused by every layer, short compile time, no graph breaks across ZeRO hooks). The
checkpoint call sits inside the compiled region, so the compiler sees the recompute policy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .model import GPT, ImageCausalBlock, TransformerBlock

CHECKPOINTING = ("none", "full", "selective", "alternate")

_aten = torch.ops.aten
# outputs kept by "selective": the FLOP-heavy ops; everything else in a block is recomputed in backward
_SAVE_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
for _name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"):
    if hasattr(_aten, _name):
        _SAVE_OPS.add(getattr(_aten, _name).default)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """torch.utils.checkpoint context_fn of the "selective" mode (a fresh pair of contexts per call)."""
    return create_selective_checkpoint_contexts(_policy)


def optimize_for_training(model: GPT, *, compile: bool = False, checkpointing: str = "none") -> GPT:
    """Set activation checkpointing on every backbone block and optionally torch.compile each block, in place.

    Returns the same model. GPTConfig.grad_checkpointing=True with checkpointing="none" stays "full" (the config
    flag is honoured unless a mode is chosen here). Call before wrapping the model (DDP / DeepSpeed / accelerate).
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing={checkpointing!r}; valid: {', '.join(map(repr, CHECKPOINTING))}")
    if not isinstance(model, GPT):
        raise TypeError(f"optimize_for_training expects a generator.GPT, got {type(model).__name__}")
    if checkpointing == "none" and model.config.grad_checkpointing:
        checkpointing = "full"
    for i, block in enumerate(model.layers):
        block.activation_checkpointing = {
            "none": None,
            "full": {},
            # saved_tensors_hooks (e.g. save_on_cpu) apply to what the policy saves, as they do without it
            "selective": dict(context_fn=selective_context, respect_saved_tensors_hooks=True),
            "alternate": {} if i % 2 == 0 else None,
        }[checkpointing]
    if compile:
        compile_blocks(model)
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compile: nn.Module.compile() (in place, keys unchanged) on every TransformerBlock/ImageCausalBlock."""
    for m in model.modules():
        if isinstance(m, (TransformerBlock, ImageCausalBlock)) and not is_compiled(m):
            m.compile(**compile_kwargs)
    return model


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def attention_kernels(fn) -> list[str]:
    """Names of the scaled-dot-product-attention kernels (aten ops) that run inside fn() (one call, profiled):
    e.g. ['aten::_scaled_dot_product_flash_attention'] on a GPU in bf16, '..._for_cpu' on the CPU,
    '..._efficient_attention' or '_scaled_dot_product_attention_math' when flash is not eligible."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    ops = {n for n in names if n.startswith("aten::_scaled_dot_product") or n == "aten::_efficient_attention_forward"
           or n == "aten::_flash_attention_forward"}
    gpu = {n for n in names if not n.startswith(("aten::", "autograd::", "torch::"))
           and any(w in n.lower() for w in ("flash", "fmha", "attention"))}  # CUDA kernel names
    return sorted(ops) + sorted(gpu)
