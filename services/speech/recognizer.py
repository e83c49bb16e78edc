"""Whisper on a window fitted to the clip.

faster-whisper pads every clip to Whisper's 30-s window before the encoder (``pad_or_trim`` to
3000 frames, whatever ``chunk_length`` says), so a 4-s utterance costs the encoder as much as
30 s of audio: measured here with tiny.en int8 on one thread, 0.48 CPU-s per 30-s window against
0.026 for a 5-s one, ~85% of a short clip's recognition. CTranslate2's Whisper encoder takes
a shorter input, so for clips up to :data:`MAX_SHORT_S` this module runs the encoder on a window
of the clip plus a second, at least :data:`MIN_WINDOW_S` (shorter windows lost accuracy on
espeak's speech here: 10.9% WER at clip + 1 s against 8.4% at 10 s, for the same CPU), and decodes greedily (or with ``beam_size``) without timestamps, as
faster-whisper does for one window, with its prompt layout, suppressed tokens and no-speech gate.
Longer clips go through faster-whisper's own ``transcribe``. The benchmark compares the two on
the same clips (``benchmarks/bench_speech.py``: WER and CPU seconds per audio second).
"""

from __future__ import annotations

import math
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from .core import Segment

FRAMES_PER_S = 100  # Whisper's log-mel hop: 160 samples at 16 kHz
MAX_SHORT_S = 28.0  # longer clips: faster-whisper's 30-s windows
MIN_WINDOW_S = 10
NO_SPEECH_PROB, LOGPROB_FLOOR = 0.6, -1.0  # faster-whisper's defaults: below both, the window is silence
MAX_TOKENS = 224  # half the decoder's context, as faster-whisper bounds a prompt


def window_s(seconds: float) -> int:
    """Seconds of audio the encoder gets for a clip of ``seconds``: the clip and 1 s, whole seconds,
    at least MIN_WINDOW_S."""
    return max(MIN_WINDOW_S, min(30, math.ceil(seconds) + 1))


def recognize(model: Any, audio: np.ndarray, language: str, prompt: str | None, temperature: float,
              beam_size: int) -> list[Segment]:
    """One segment (or none, for silence) for ``audio`` (float32 mono 16 kHz, <= MAX_SHORT_S)."""
    seconds = audio.size / 16000
    features = model.feature_extractor(audio)[:, :-1]  # the last frame is padding, as faster-whisper drops it
    window = pad_or_trim(features, window_s(seconds) * FRAMES_PER_S)
    encoded = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(window[None])),
                                 to_cpu=False)
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
    previous = tokenizer.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
    sequence = model.get_prompt(tokenizer, previous, without_timestamps=True)
    sampling = {"sampling_topk": 0, "sampling_temperature": temperature} if temperature > 0 else {}
    result = model.model.generate(
        encoded, [sequence], beam_size=1 if temperature > 0 else beam_size, max_length=MAX_TOKENS,
        return_scores=True, return_no_speech_prob=True, suppress_blank=True,
        suppress_tokens=get_suppressed_tokens(tokenizer, (-1,)), **sampling)[0]
    tokens = result.sequences_ids[0]
    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
    if result.no_speech_prob > NO_SPEECH_PROB and avg_logprob < LOGPROB_FLOOR:
        return []
    text = tokenizer.decode(tokens)
    return [Segment(0.0, round(seconds, 3), text)] if text.strip() else []
