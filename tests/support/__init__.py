"""Test helpers, one importable package (``tests`` is on the path: pytest's ``pythonpath``).

- ``servers``: nats-server, livekit-server and the webhook receiver for a test session; free ports.
- ``harness``: ``Procs``, the one way a test starts a crosstalk process and waits until it is ready.
- ``fake_agent``: a real livekit-agents worker that joins, reports and leaves (run as a process).
- ``sink``: the transcript sink run in the test's own process, and whether it has drained.
- ``leases``: grants written straight to the ROLES stream.
- ``dispatcher``: the settings and batch spec the dispatcher's unit tests start from.
- ``results``: a batch's results as the stack leaves them (BatchFinished, batch.json, transcripts).
- ``rooms``: livekit-server's view of a batch's rooms, polled while it runs.
- ``prometheus``: a real Prometheus and the dashboards' queries.
"""
