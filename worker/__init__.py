"""The unified LiveKit worker (``python -m worker``: __main__.py, main.py) and one job's flow (job.py).

Subpackages, each importing only those below it: simulator/ -> pair/ -> voice/, lifecycle/ (no edge between
the last two); tests/unit/test_worker_layout.py keeps it so.
"""
