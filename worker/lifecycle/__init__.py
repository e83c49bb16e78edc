"""The job's life around its conversation, the same for every job: the AgentServer, the lease, the reports,
the turn-taking core, the capacity heartbeats and the watchdog. Imports nothing else from worker/."""
