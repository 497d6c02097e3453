"""Launching workers on schedulers (rbridge.launch.slurm)."""
