"""Server configs (nats, livekit, prometheus, grafana), the tool installer, and the stack tool (``infra.stack``)."""
