"""Offline speech on this machine: TTS real-time factor (Piper, espeak-ng), STT real-time factor and
word error rate (faster-whisper tiny.en), through a real ``python -m services.speech`` process.

    PYTHONPATH=.:tests python benchmarks/bench_speech.py [--rounds 2] [--concurrency 4]

Every figure is measured from outside the service: the audio duration from the WAV bytes it
served, the time on the client's clock, the CPU from the process's own counters (psutil), the WER
from what it transcribed against the text that was spoken. The service's own engine-only RTF
(its /metrics histogram) is reported beside, to show what HTTP, resampling and encoding add.
RTF = seconds of compute (wall) per second of audio: below 1 is faster than real time.
Recognition runs on two services side by side, clip by clip: Whisper's encoder window fitted to
the clip (the default) and its full 30-s window. Writes benchmarks/results/speech.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path
from typing import Any

import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families
from support.harness import Procs

from benchmarks.bench_batch import machine
from shared.wer import corpus_wer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speech.json"

ENGLISH = [
    "Hello, thank you for calling support. How can I help you today?",
    "Hi, my order number is 42 and it arrived two days late.",
    "I'm sorry to hear that. Let me look up your order right away.",
    "The headphones were damaged in the box, so I would like a refund.",
    "I can offer a replacement or a full refund to your original payment method.",
    "A refund, please. Could you also update my delivery address?",
    "Of course. What is the new address you would like us to use?",
    "It is 17 Park Lane, apartment 5, in Springfield.",
    "Thank you. The refund will reach your card within five business days.",
    "Great, that is everything I needed. Have a nice day!",
]
HINDI = [
    "नमस्ते, मैं आपकी कैसे मदद कर सकता हूँ?",
    "मेरा ऑर्डर दो दिन देर से आया और डिब्बा टूटा हुआ था।",
    "मुझे इसके लिए खेद है, मैं अभी आपका रिफंड शुरू करता हूँ।",
]


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def engine_rtf(metrics_url: str) -> dict[str, float | None]:
    """The service's own engine-only RTF (sum/count of crosstalk_speech_real_time_factor)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "crosstalk_speech_real_time_factor_sum":
                sums[s.labels["engine"]] = s.value
            elif s.name == "crosstalk_speech_real_time_factor_count":
                counts[s.labels["engine"]] = s.value
    return {e: round(sums[e] / counts[e], 4) if counts.get(e) else None for e in sums}


async def tts_run(client: openai.AsyncOpenAI, voice: str, texts: list[str], concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[float, float, bytes]] = []

    async def one(text: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            resp = await client.audio.speech.create(model="tts-1", voice=voice, input=text,  # type: ignore[arg-type]
                                                    response_format="wav")
            wall = time.perf_counter() - t0
            results.append((wall, wav_seconds(resp.content), resp.content))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    wall = time.perf_counter() - t0
    audio_s = sum(a for _, a, _ in results)
    return {
        "voice": voice, "requests": len(texts), "concurrency": concurrency, "wall_s": round(wall, 3),
        "audio_s": round(audio_s, 3),
        "request_rtf": stats([w / a for w, a, _ in results]),
        "throughput_audio_s_per_s": round(audio_s / wall, 2),
        "audio": [r[2] for r in results],
    }


async def ttfa_pcm(client: openai.AsyncOpenAI, text: str) -> tuple[float, float]:
    """(first audio byte, whole answer) seconds for streamed pcm: Piper sends sentence by sentence."""
    t0 = time.perf_counter()
    first = None
    async with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="en-joe", input=text, response_format="pcm") as resp:  # type: ignore[arg-type]
        async for _ in resp.iter_bytes():
            if first is None:
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


async def stt_run(clients: dict[str, openai.AsyncOpenAI], clips: list[bytes], texts: list[str]) -> dict[str, Any]:
    """Each clip to every service in turn (one per Whisper window mode), so machine load that comes
    and goes falls on both alike."""
    walls: dict[str, list[float]] = {k: [] for k in clients}
    pairs: dict[str, list[tuple[str, str]]] = {k: [] for k in clients}
    audio = [wav_seconds(c) for c in clips]
    for clip, text in zip(clips, texts, strict=True):
        for window, client in clients.items():
            t0 = time.perf_counter()
            tr = await client.audio.transcriptions.create(file=("a.wav", clip, "audio/wav"), model="whisper-1",
                                                          language="en")
            walls[window].append(time.perf_counter() - t0)
            pairs[window].append((text, tr.text))
    return {window: {"requests": len(clips), "audio_s": round(sum(audio), 3),
                     "request_rtf": stats([w / a for w, a in zip(walls[window], audio, strict=True)]),
                     "wer": round(corpus_wer(pairs[window]), 4),
                     "worst": max(pairs[window], key=lambda p: corpus_wer([p]))}
            for window in clients}


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="crosstalk-offline", max_retries=0, timeout=600)


def cpu_s(proc: psutil.Process) -> float:
    """The service's CPU seconds so far, with its finished children's (each espeak-ng run)."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


async def bench(url: str, full_window_url: str, proc: psutil.Process, full_proc: psutil.Process, metrics_url: str,
                rounds: int, concurrency: int) -> dict[str, Any]:
    client = _client(url)
    out: dict[str, Any] = {"tts": [], "stt": {}}
    cpu0 = cpu_s(proc)
    clips: dict[str, list[bytes]] = {}
    for voice, texts in (("en-joe", ENGLISH), ("en-espeak", ENGLISH), ("hi-espeak", HINDI)):
        for conc in (1, concurrency):
            before = cpu_s(proc)
            run = await tts_run(client, voice, texts * rounds, conc)
            # CPU, not wall: the cost whatever else the machine runs (the service's own counters)
            run["cpu_s_per_audio_s"] = round((cpu_s(proc) - before) / run["audio_s"], 4)
            if conc == 1:
                clips[voice] = run["audio"][:len(texts)]
            del run["audio"]
            out["tts"].append(run)
            print(f"tts {voice} x{conc}: request RTF {run['request_rtf']['mean']}, "
                  f"{run['throughput_audio_s_per_s']} audio s/s, {run['cpu_s_per_audio_s']} CPU-s per audio-s",
                  flush=True)
    full = _client(full_window_url)
    stt_cpu0 = {"adaptive": cpu_s(proc), "full": cpu_s(full_proc)}
    stt_audio = 0.0
    for voice in ("en-joe", "en-espeak"):
        runs = await stt_run({"adaptive": client, "full": full}, clips[voice], ENGLISH)
        out["stt"][f"on_{voice}"] = runs["adaptive"]
        out["stt"][f"on_{voice}_full_30s_window"] = runs["full"]
        for window, run in runs.items():
            print(f"stt on {voice} ({window} window): request RTF {run['request_rtf']['mean']}, WER {run['wer']}",
                  flush=True)
        stt_audio += runs["adaptive"]["audio_s"]
    # CPU, not wall: what recognition costs whatever else the machine runs (the service's own counters)
    out["stt"]["cpu_s_per_audio_s"] = {
        "adaptive": round((cpu_s(proc) - stt_cpu0["adaptive"]) / stt_audio, 4),
        "full_30s_window": round((cpu_s(full_proc) - stt_cpu0["full"]) / stt_audio, 4)}
    print(f"stt CPU-s per audio-s: {out['stt']['cpu_s_per_audio_s']}", flush=True)
    await full.close()
    firsts = [await ttfa_pcm(client, " ".join(ENGLISH[:3])) for _ in range(3)]
    out["pcm_stream_en_joe_3_sentences"] = {"first_audio_s": stats([f for f, _ in firsts]),
                                            "total_s": stats([t for _, t in firsts])}
    out["service_cpu_s"] = round(cpu_s(proc) - cpu0, 2)
    out["service_engine_rtf_mean"] = engine_rtf(metrics_url)
    out["service_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
    await client.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="times each sentence list is synthesised per run")
    ap.add_argument("--concurrency", type=int, default=4, help="requests at once in the concurrent runs")
    ap.add_argument("--workers", type=int, default=2, help="CROSSTALK_SPEECH_WORKERS of the service")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.concurrency < 1 or args.workers < 1:
        ap.error("--rounds, --concurrency and --workers must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        procs = Procs(Path(tmp), "nats://127.0.0.1:1")
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        try:
            svc = procs.speech(CROSSTALK_SPEECH_WORKERS=str(args.workers))
            startup = time.perf_counter() - t0
            # the same service with Whisper's full 30-s window, for the STT comparison only
            full = procs.speech(CROSSTALK_SPEECH_WORKERS=str(args.workers), CROSSTALK_SPEECH_STT_WINDOW="full")
            assert svc.popen is not None and full.popen is not None
            report = asyncio.run(bench(svc.info["url"], full.info["url"], psutil.Process(svc.popen.pid),
                                       psutil.Process(full.popen.pid),
                                       f"http://127.0.0.1:{svc.metrics_port}/metrics", args.rounds, args.concurrency))
        except BaseException:
            print(procs.logs(), file=sys.stderr)
            raise
        finally:
            procs.stop_all()
    report = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
                    "note": "2 cores shared with other work while this ran: see the load averages"},
        "service": {"workers": args.workers, "tts_threads": 1, "stt_threads": 1, "stt_beam_size": 1,
                    "stt_window": "adaptive (the clip + 1 s, at least 10 s; *_full_30s_window: a second service, 30 s)",
                    "startup_s": round(startup, 2)},
        **report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
