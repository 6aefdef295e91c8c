"""Runs on several devices: a worker starts one run's ranks with torchrun and supervises them.

``launch.py`` (the supervisor, in the worker process) writes what the ranks need into the run's
launch folder, starts ``torchrun --standalone --nproc-per-node N -m worker.distributed.rank_main``
and waits, passing cancel requests in and progress out through small files; ``rank_main.py`` is
what each rank runs: it joins the process group, trains with ``worker.training.runner`` (rank 0
with the real sink) and leaves its result or its error in the folder. ``parent.py`` ties every
process's life to its parent's, so a killed worker leaves no rank behind.
"""
