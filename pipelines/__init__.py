"""Wires the stages: `MGVQPipeline` (tokenizer + generator + class names), the `mgvq` CLI and the demo."""
from .pipeline import ImagePipelineOutput, MGVQPipeline, SamplingDefaults, check_compatible

__all__ = ["MGVQPipeline", "ImagePipelineOutput", "SamplingDefaults", "check_compatible"]
