"""Export checkpoints to deployment formats: Hugging Face (Hope remote code or plain Llama), bf16/fp16, int8.

``hope-scale export`` (``cli.py``) -> ``export.export``; see docs/export.md.
"""
