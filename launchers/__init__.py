"""Launchers: `lbva launch slurm` (submitit), `lbva launch local` (torchrun), the per-rank worker,
and signal handling that turns Slurm's signals into a checkpoint at the next step boundary."""
