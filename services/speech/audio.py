"""Audio plumbing with PyAV (FFmpeg; already a livekit-agents dependency): resample the engines'
output to the wire rate, encode it in the requested format, decode uploaded files for Whisper.

All of it is blocking CPU work: the service runs it in its pool, never on the event loop.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Iterator

import av
import numpy as np

from shared.openai_errors import RequestError
from shared.voices import OUTPUT_SAMPLE_RATE

WHISPER_RATE = 16000


class Resampler:
    """Mono 16-bit PCM from ``rate_in`` to ``rate_out``, chunk by chunk (state kept between chunks)."""

    def __init__(self, rate_in: int, rate_out: int = OUTPUT_SAMPLE_RATE) -> None:
        self.rate_in = rate_in
        self._same = rate_in == rate_out
        self._r = None if self._same else av.AudioResampler(format="s16", layout="mono", rate=rate_out)
        self._pts = 0

    def _out(self, frames: Iterable[av.AudioFrame]) -> bytes:
        return b"".join(bytes(f.to_ndarray().astype("<i2").tobytes()) for f in frames)

    def push(self, pcm: bytes) -> bytes:
        if self._same or not pcm:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate_in
        frame.pts = self._pts
        self._pts += samples.shape[1]
        assert self._r is not None
        return self._out(self._r.resample(frame))

    def flush(self) -> bytes:
        if self._same:
            return b""
        assert self._r is not None
        return self._out(self._r.resample(None))


def resample(pcm: bytes, rate_in: int, rate_out: int = OUTPUT_SAMPLE_RATE) -> bytes:
    r = Resampler(rate_in, rate_out)
    return r.push(pcm) + r.flush()


def wav_header(rate: int, data_bytes: int | None) -> bytes:
    """RIFF/WAVE header for mono 16-bit PCM; ``None``: unknown length (streamed), sizes set to the maximum."""
    size = 0xFFFFFFFF - 36 if data_bytes is None else data_bytes
    return (b"RIFF" + struct.pack("<I", size + 36) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", size))


# format -> (container, codec, codec rate)
_CODECS = {
    "mp3": ("mp3", "libmp3lame", OUTPUT_SAMPLE_RATE),
    "opus": ("ogg", "libopus", 48000),  # libopus encodes 48 kHz natively; decoders report 48 kHz
    "aac": ("adts", "aac", OUTPUT_SAMPLE_RATE),
    "flac": ("flac", "flac", OUTPUT_SAMPLE_RATE),
}


def encode(pcm: bytes, fmt: str, rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    """Mono 16-bit PCM at ``rate`` as ``fmt`` (pcm, wav, mp3, opus, aac, flac)."""
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        return wav_header(rate, len(pcm)) + pcm
    container, codec, codec_rate = _CODECS[fmt]
    if codec_rate != rate:
        pcm, rate = resample(pcm, rate, codec_rate), codec_rate
    out = io.BytesIO()
    with av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=rate, layout="mono")
        if pcm:  # no audio: a valid container with no frames (an empty frame is an FFmpeg error)
            samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = 0
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue()


def decode_upload(data: bytes) -> np.ndarray:
    """An uploaded audio file (any container FFmpeg reads) as float32 mono at 16 kHz, Whisper's input."""
    from faster_whisper.audio import decode_audio

    if not data:
        raise RequestError("file", "is empty")
    try:
        audio = decode_audio(io.BytesIO(data), sampling_rate=WHISPER_RATE)
    except (av.FFmpegError, ValueError, IndexError, StopIteration) as exc:
        raise RequestError("file", f"is not a readable audio file ({type(exc).__name__}: {exc})") from None
    if audio.size == 0:
        raise RequestError("file", "contains no audio samples")
    return audio


def wav_data(wav: bytes) -> bytes:
    """The sample bytes of a RIFF/WAVE file whose sizes may be wrong (espeak-ng --stdout writes a
    streaming header): everything after the ``data`` chunk header."""
    at = wav.find(b"data", 12)
    if wav[:4] != b"RIFF" or at < 0:
        raise ValueError("not a WAV file")
    data = wav[at + 8:]
    return data[: len(data) // 2 * 2]


def chunks(pcm: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(pcm), size):
        yield pcm[i:i + size]
