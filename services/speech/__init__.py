"""Offline speech behind OpenAI's audio API: Piper and eSpeak NG (TTS), faster-whisper (STT)."""
