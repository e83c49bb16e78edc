"""The AgentSession and what it speaks and hears with, for crosstalk's pair and the simulator alike: models,
speech (STT, TTS, the process's VAD), the recording tap and its upload, the coalesced transcription."""
