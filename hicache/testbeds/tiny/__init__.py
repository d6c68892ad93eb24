"""Tiny random pipelines of the real diffusers classes (same code path as the full-size models, toy sizes),
with tokenizers built locally: what the tests and the CPU smoke runs of every model config use."""
