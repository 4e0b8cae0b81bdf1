"""Shared pytest set-up for simbook's unit tests and nbval notebook runs."""
import os

# Triton kernels only run on CPU through the interpreter, and the variable is read
# when `@triton.jit` runs, so set it before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
