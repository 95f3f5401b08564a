"""Sharded asynchronous checkpoints, atomic commit and retention, resharding resume, export and
import. Lands with the checkpoint issue; today a run writes its final weights as safetensors."""
