"""Optional integrations: TensorBoard export, PyTorch Lightning and Hugging Face Trainer callbacks.

Each submodule imports its framework lazily, so ``import normscope`` never needs them.
"""
