"""The Accelerator for every entry point: precision, DeepSpeed (launcher config or a JSON given here), the CPU/gloo
case, trackers. Launcher-agnostic: `python -m`, `torchrun` and `accelerate launch` all end up here."""
from __future__ import annotations

import os
import socket

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str) -> str:
    """auto | bf16 | fp16 | fp32 (also accelerate's "no") -> accelerate's mixed_precision value.

    auto: the launcher's choice (ACCELERATE_MIXED_PRECISION), else bf16 on GPUs that support it, else fp32."""
    if precision in ("fp32", "no"):
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "auto":
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env:
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _single_process_env() -> None:
    """DeepSpeed outside a launcher: pretend to be rank 0 of 1 (else it tries MPI discovery)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched distributed); before any set-up."""
    return int(os.environ.get("RANK", "0"))


def build_accelerator(precision: str = "auto", deepspeed: str | None = None, trackers: list[str] | None = None,
                      project_dir: str | None = None, timeout_s: float | None = None):
    """An `accelerate.Accelerator` for this launch.

    - CPU: plain DDP needs cpu=True (else accelerate 1.15 silently picks no distribution) and the gloo backend;
      a single process gets no process-group kwargs at all (accelerate would create a group).
    - DeepSpeed: from the launcher (ACCELERATE_USE_DEEPSPEED) or `deepspeed=<json>` (not both); on CPU it runs with
      DS_ACCELERATOR=cpu. Without a launcher, a single process is set up as rank 0 of 1.
    - Refuses a multi-process launch for which accelerate chose no distribution (unsynchronised gradients)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

    use_ds_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cuda = torch.cuda.is_available()
    if (deepspeed or use_ds_env) and not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if deepspeed:
        if use_ds_env:
            raise ValueError("deepspeed= was given but the launcher already configures DeepSpeed "
                             "(accelerate launch with a DeepSpeed config): use one of the two")
        if not os.path.isfile(deepspeed):
            raise FileNotFoundError(f"deepspeed={deepspeed!r}: DeepSpeed JSON not found")
        _single_process_env()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or bool(deepspeed) or use_ds_env
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    handlers = [InitProcessGroupKwargs(backend=None if cuda else "gloo", **kwargs)] if distributed and (
        not cuda or kwargs) else []
    acc = Accelerator(cpu=not cuda and not (deepspeed or use_ds_env), mixed_precision=resolve_precision(precision),
                      deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed) if deepspeed else None,
                      kwargs_handlers=handlers, log_with=trackers or None, project_dir=project_dir)
    if distributed and acc.num_processes > 1 and acc.distributed_type == DistributedType.NO:
        raise RuntimeError(f"launched with {acc.num_processes} processes but accelerate chose no distribution; "
                           f"gradients would not be synchronised")
    return acc


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    return acc.state.deepspeed_plugin.zero_stage if is_deepspeed(acc) else 0


def configure_deepspeed(acc, micro_batch: int, grad_accum: int, global_batch: int, grad_clip: float) -> None:
    """The training config owns batch sizes and clipping: fill DeepSpeed's "auto" values, refuse contradictions and
    a JSON-defined optimizer / scheduler (the script passes torch AdamW and sets the lr itself)."""
    dsc = acc.state.deepspeed_plugin.deepspeed_config
    owned = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
             "train_batch_size": global_batch, "gradient_clipping": grad_clip}
    for k, v in owned.items():
        if dsc.get(k, "auto") not in ("auto", v):
            raise ValueError(f"DeepSpeed config sets {k}={dsc[k]} but the training config implies {v}; set it "
                             f"to \"auto\" in the JSON (the training config owns batch sizes and clipping)")
        dsc[k] = v
    if "optimizer" in dsc or "scheduler" in dsc:
        raise ValueError("the DeepSpeed JSON must not define optimizer/scheduler: the script passes torch AdamW "
                         "and sets the lr itself")
