"""Integrations with other libraries: PEFT (LoRA over FP8), bitsandbytes (QLoRA bases), tokenizers.

The PEFT and bitsandbytes modules import their optional dependency; nothing here is imported by the model
unless it is used.
"""
