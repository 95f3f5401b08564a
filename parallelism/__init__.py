"""Device mesh, FSDP2/HSDP, tensor + sequence parallel plans, Ulysses context parallel, pipeline
stages, activation checkpointing, torch.compile and FP8, applied to a built model from outside.

Lands with the parallelism issue; the model already takes its attention kernels as injected
callables (models/attention.py), which is where Ulysses attention will plug in.
"""
