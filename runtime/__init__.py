"""Shared run infrastructure for every stage and command (a leaf package: it imports none of tokenizer/, generator/,
evaluation/, pipelines/).

    outdir      check_output_dir (writable + free space, up front), RunLock (one process per output folder)
    io          atomic JSON / bytes / safetensors writes, strict JSON
    config      dataclass defaults <- YAML <- key=value (one parser, one precedence rule, deprecated names)
    checkpoint  CheckpointFolder (list / resolve resume / atomic save + rotate), pickle-free training state,
                run identity check, metrics.jsonl truncation on resume
    ema         EMA of parameters (fp32 shadow)
    accel       build_accelerator (precision, DeepSpeed, CPU/gloo), DeepSpeed batch/clip ownership
    optim       AdamW (fused on CUDA), warmup + constant / cosine lr
    guard       NonFiniteGuard: skip + count non-finite steps, stop after N in a row
    metrics     MetricLogger: metrics.jsonl + accelerate trackers (tensorboard / wandb / mlflow / none)
    grid        labelled image grids (class names per row; "original", "first g groups"...)
    fingerprint sha256 of a tokenizer's weights; check that codes and tokenizer belong together
    cli_args    per-sub-codebook sampling flags shared by the sampling commands
"""
