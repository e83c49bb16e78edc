"""The dispatcher: owns every batch from ``batch.start`` to ``BatchFinished``.

- ``core.py``: pure decisions (validate a command, fold batch events, plan dispatches, deadlines, liveness).
- ``rooms.py``: LiveKit rooms and explicit agent dispatches through livekit-api.
- ``main.py``: NATS wiring (durable consumers, the event log, request replies) around the core.

Run one dispatcher per deployment (``python -m services.dispatcher``); workers,
allocators and sinks scale out, and the batch log lets a restarted dispatcher
carry on where the last one stopped.
"""
