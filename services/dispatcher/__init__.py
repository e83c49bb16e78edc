"""The dispatcher: owns every batch from ``batch.start`` to ``BatchFinished``.

- pure core: ``validate.py`` (a decoded command -> a batch spec or the field and why),
  ``state.py`` (a batch's state as a fold of its events), ``core.py`` (decisions and admission),
  ``cancel.py`` (``batch.cancel``: the reply and the ``BatchCancelled`` it appends).
- ``handlers.py``: the handler table (message type -> handler); decide, append, then run effects.
- ``eventlog.py`` (the batch log), ``rooms.py`` (LiveKit), ``verdicts.py`` (request replies): adapters.
- ``inputs.py``: wire messages and timers decoded into messages; ``main.py``: the bootstrap.

Run one dispatcher per deployment (``python -m services.dispatcher``); workers,
allocators and sinks scale out, and the batch log lets a restarted dispatcher
carry on where the last one stopped.
"""
