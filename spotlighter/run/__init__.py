"""The protocol runner: ``python -m spotlighter.run base2new spotlighter imagenet 16``.

It builds each protocol's job graph (train on base -> test on new per seed; train on the source ->
evaluate every target; DG likewise), decides from each job's output folder what it needs (skip,
resume, redo a stale evaluation, refuse other options, FORCE), and runs it with a launcher: local
(one job at a time, ``JOBS=N`` or ``GPUS="0 1"`` at a time) or SLURM (``LAUNCHER=slurm``: sbatch with
dependencies; ``python -m spotlighter.run status ...`` shows where it stands). See cli.py.
Plain Python (no torch, no Dassl).
"""
