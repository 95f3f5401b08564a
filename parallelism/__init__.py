"""Device mesh, FSDP2/HSDP, tensor + sequence parallel plans, Ulysses context parallel, pipeline
stages, activation checkpointing, torch.compile and FP8, applied to a built model from outside.

It knows the model through its pieces (models/mot.py: embed, depths, heads; models/blocks.py:
DepthState, Depth) and a step through the hooks of step_layout.py; it imports nothing of training,
which hands it the batches and the loss function.
"""
