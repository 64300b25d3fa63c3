"""Model loading: diffusion pipelines + LoRA, open_clip evaluators, LLM engines."""
