"""The stack tool behind ``just up`` / ``down`` / ``status`` / ``logs`` / ``check`` / ``batch`` / ``demo``.

``up`` writes ``<run dir>/supervisord.conf`` (absolute paths) for nats-server, livekit-server,
every crosstalk process, and Prometheus/Grafana when they are installed and configured; it
starts supervisord (or updates the one already running, so a second ``up`` is harmless), waits
until every program is healthy and prints what runs where. ``down`` shuts that supervisord
down, kills whatever it left behind (only processes carrying this run dir's stack tag) and
checks that the ports are free.

Where a change goes:

- ``config``: every variable the stack reads, derived from ``shared.config`` (one config)
- ``sizing``: how many worker processes the machine holds
- ``plan``: which programs run, with their argv, ports and health URL
- ``render``: supervisord.conf, livekit.yaml and prometheus.yml for the run dir
- ``supervisor``: supervisord's XML-RPC, the run-dir lock, the environment it starts with
- ``probes``: this stack's processes, ports, HTTP health, log tails
- ``commands``: up, down, status, logs
- ``demo``: check, batch (through the CLI's code), demo
- ``__main__``: the command line the justfile calls (``python -m infra.stack up``)

Secrets reach the programs through supervisord's inherited environment, never through a file
or a printed line.
"""
