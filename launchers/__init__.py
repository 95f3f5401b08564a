"""Slurm (sbatch + submitit) and local launchers, signal handling, requeue and auto-resume.

Lands with the Slurm issue.
"""
