"""The speech service's pure parts: request checks (every refusal names the field), response shapes,
the voice catalogue, the WER helper, and the audio plumbing (real PyAV, no models)."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest

from services.speech import audio, core
from shared import voices
from shared.openai_errors import RequestError
from shared.wer import corpus_wer, normalize, wer


def speech(**over: object) -> bytes:
    body = {"model": "tts-1", "input": "Hello.", "voice": "en-joe", **over}
    return json.dumps(body).encode()


def test_speech_defaults_follow_openai() -> None:
    job = core.decode_speech(speech(), 4096)
    assert (job.voice.name, job.response_format, job.speed, job.text) == ("en-joe", "mp3", 1.0, "Hello.")
    assert job.content_type == "audio/mpeg"
    assert core.decode_speech(speech(voice={"id": "hi-espeak"}, input="नमस्ते"), 10).voice.engine == "espeak"


@pytest.mark.parametrize("over,param", [
    ({"voice": "ash"}, "voice"), ({"voice": {"name": "x"}}, "voice"), ({"input": ""}, "input"), ({"input": " ?!… "}, "input"),
    ({"input": "x" * 11}, "input"), ({"response_format": "ogg"}, "response_format"),
    ({"speed": 0.1}, "speed"), ({"speed": 4.5}, "speed"), ({"model": "x"}, "model"),
    ({"stream_format": "x"}, "stream_format"), ({"instructions": 3}, "instructions"),
])
def test_bad_speech_names_the_field(over: dict[str, object], param: str) -> None:
    with pytest.raises(RequestError) as err:
        core.decode_speech(speech(**over), 10)
    assert err.value.param == param
    assert err.value.body()["error"]["param"] == param


def test_transcription_fields() -> None:
    job = core.decode_transcription({"model": ["whisper-1"], "prompt": ["orders"]}, True)
    assert (job.language, job.prompt, job.response_format, job.temperature) == ("en", "orders", "json", 0.0)
    assert core.decode_transcription({"model": ["whisper-1"], "languages[]": ["en-US"]}, True).language == "en"
    for fields, has_file, param in [({"model": ["whisper-1"]}, False, "file"), ({}, True, "model"),
                                    ({"model": ["whisper-1"], "language": ["hi"]}, True, "language"),
                                    ({"model": ["whisper-1"], "temperature": ["2"]}, True, "temperature")]:
        with pytest.raises(RequestError) as err:
            core.decode_transcription(fields, has_file)
        assert err.value.param == param


def test_transcription_bodies() -> None:
    segs = [core.Segment(0.0, 1.5, " Hello there."), core.Segment(1.5, 3.25, " How are you?")]
    job = core.decode_transcription({"model": ["whisper-1"]}, True)
    ctype, body = core.transcription_body(job, segs, 3.4)
    assert ctype == "application/json" and json.loads(body)["text"] == "Hello there. How are you?"
    verbose = core.TranscribeJob("en", None, "verbose_json", 0.0)
    obj = json.loads(core.transcription_body(verbose, segs, 3.4)[1])
    assert (obj["language"], obj["duration"], len(obj["segments"])) == ("english", 3.4, 2)
    srt = core.transcription_body(core.TranscribeJob("en", None, "srt", 0.0), segs, 3.4)[1].decode()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 00:00:03,250")


def test_catalogue_checks_voice_and_language() -> None:
    assert voices.default_voice("hi").name == "hi-espeak"
    assert voices.default_voice("en-US").name == "en-joe"
    assert voices.check_voice("en-espeak", "en").engine == "espeak"
    for name, lang, param in [("nobody", "en", "voice"), ("en-joe", "hi", "voice"), (None, "fr", "language")]:
        with pytest.raises(voices.VoiceError) as err:
            voices.check_voice(name, lang)
        assert err.value.param == param
    assert voices.stt_offline("en") and not voices.stt_offline("hi")
    assert voices.resolve(None, "hi", real=False) == "hi-espeak"
    assert voices.resolve("nova", "fr", real=True) == "nova" and voices.resolve(None, "fr", real=True) == "alloy"
    with pytest.raises(voices.VoiceError):
        voices.resolve("nova", "en", real=False)


def test_wer_normalises_case_punctuation_and_numbers() -> None:
    assert normalize("Order #42, ok?  It's 3.5%!") == "order forty two ok it is three point five percent"
    assert wer("Great, that is everything I needed.", "Great, that’s everything I needed.") == 0.0
    assert wer("My order 42 arrived late.", "my order forty-two arrived late") == 0.0
    assert wer("one two three four", "one two four") == 0.25
    assert wer("", "") == 0.0 and wer("hello", "") == 1.0
    assert normalize("नमस्ते, आप कैसे हैं?", "hi") == "नमस्ते आप कैसे हैं"
    assert corpus_wer([("a b c d", "a b c"), ("e f", "e f")]) == pytest.approx(1 / 6)


def test_resample_and_encode() -> None:
    tone = (np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050) * 8000).astype("<i2").tobytes()
    out = audio.resample(tone, 22050)
    assert abs(len(out) / 2 - 24000) < 100  # one second at 24 kHz
    r = audio.Resampler(22050)
    chunked = r.push(tone[:20000]) + r.push(tone[20000:]) + r.flush()
    assert abs(len(chunked) - len(out)) < 200
    with wave.open(io.BytesIO(audio.encode(out, "wav"))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
    for fmt in ("mp3", "opus", "aac", "flac"):
        decoded = audio.decode_upload(audio.encode(out, fmt))
        assert abs(decoded.size / audio.WHISPER_RATE - 1.0) < 0.15, fmt
    assert audio.wav_data(audio.wav_header(24000, None) + b"\1\0\2\0\3") == b"\1\0\2\0"
    for fmt in ("pcm", "wav", "mp3", "opus", "aac", "flac"):  # no audio at all is still a valid answer
        assert isinstance(audio.encode(b"", fmt), bytes)


def test_speech_settings_name_the_variable() -> None:
    from shared.config import ConfigError, load

    offline = load({})
    assert (offline.real_speech, offline.speech_base_url, offline.speech_port) == (False, "http://127.0.0.1:8090/v1", 8090)
    real = load({"OPENAI_API_KEY": "sk-test"})
    assert real.real_speech and real.speech_base_url == "https://api.openai.com/v1"
    assert (real.speech_tts_model, real.speech_stt_model) == ("gpt-4o-mini-tts", "gpt-4o-mini-transcribe")
    assert (offline.speech_tts_model, offline.speech_stt_model) == (voices.TTS_MODEL, voices.STT_MODEL)
    assert "sk-test" not in str(real)  # the key never reaches a log line
    mixed = load({"OPENAI_API_KEY": "sk-test", "CROSSTALK_SPEECH": "offline", "CROSSTALK_SPEECH_URL": "http://h:1/v1"})
    assert (mixed.real_speech, mixed.speech_base_url, mixed.speech_api_key) == (False, "http://h:1/v1", "crosstalk-offline")
    for env, var in [({"CROSSTALK_SPEECH": "real"}, "CROSSTALK_SPEECH"), ({"CROSSTALK_SPEECH": "x"}, "CROSSTALK_SPEECH"),
                     ({"CROSSTALK_SPEECH_WORKERS": "0"}, "CROSSTALK_SPEECH_WORKERS"),
                     ({"CROSSTALK_SPEECH_STT_THREADS": "two"}, "CROSSTALK_SPEECH_STT_THREADS"),
                     ({"CROSSTALK_SPEECH_PORT": "70000"}, "CROSSTALK_SPEECH_PORT"),
                     ({"CROSSTALK_SPEECH_STT_WINDOW": "10"}, "CROSSTALK_SPEECH_STT_WINDOW")]:
        with pytest.raises(ConfigError) as err:
            load(env)
        assert err.value.var == var


def test_whisper_window_fits_the_clip() -> None:
    from services.speech.recognizer import window_s

    assert [window_s(s) for s in (0.2, 3.4, 9.0, 12.2, 27.5, 28.0)] == [10, 10, 10, 14, 29, 29]
