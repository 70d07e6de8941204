"""Shared run infrastructure for both stages (leaf package: imports neither tokenizer/, generator/, evaluation/ nor
pipelines/). Output-folder checks, atomic writes, config loading, checkpoints, EMA, accelerator set-up, logging."""
