"""The model behind the server: one worker thread, dynamic batching, per-row streaming.

Requests become *jobs* (:mod:`.jobs`) queued to a single worker thread that owns the model. The
worker takes the oldest job, waits up to ``batch_wait_ms`` (counted from that job's arrival) for
more, then runs one left-padded ``generate`` over every queued job that is *compatible* with the
oldest (same sampling settings: greedy, or sampling with the same temperature and top-p; a job
with a ``seed`` always runs alone so its result is reproducible) up to ``max_batch_size`` rows.
A job with ``n`` choices is ``n`` rows (its prompt repeated), so requests with different ``n``
share a batch. Per-row limits differ freely within a batch: each row has its own ``max_tokens``
and stop strings, enforced by a stopping criterion that marks rows done one by one (``generate``
stops when every row is done); a job is answered (:class:`~.jobs.JobDone`) when its last row is done,
not when the batch's longest row is.

Streaming and non-streaming requests are batched together: the stopping criterion sees every
new token of every row, decodes that row's text incrementally and hands the new text (held back
while it could still be the start of a stop string or an incomplete UTF-8 character) to the
job's sink as a :class:`~.jobs.TokenDelta` event (then :class:`~.jobs.ChoiceFinished` per choice,
:class:`~.jobs.JobDone` per job, or :class:`~.jobs.Failed`); a streaming request forwards the text
as server-sent events, the others collect it.

Images are encoded with the model's :meth:`~flamingo_vlm.Flamingo.encode_images` (what the
cross-attention reads; the engine knows nothing of the perceiver's layout) once per distinct
image per batch, and the encodings of recently seen images are kept in an LRU cache keyed by a
hash of the image's bytes, so the demonstration images that few-shot prompts repeat are not
encoded again (unless the model says an image's encoding depends on its place,
``images_encode_independently``: then the pixels go to ``generate`` as ``vision_x``). The LM keys/values
of prompt prefixes are kept too (:class:`~flamingo_vlm.prefix_cache.PrefixCache`, LRU by bytes,
``prefix_cache_mb``): a request that starts with the demonstrations of an earlier one (its tokens
and, by hash, its images) runs only the rest of its prompt; scoring requests reuse them as well.

The batching window: the oldest job waits ``batch_wait_ms`` from its arrival, or from the end of
the previous batch if it arrived during it (the clients just answered tend to send again at
once; without this, requests that queued during a batch would leave alone and split the load
into uneven batches), extended up to 4x while requests are still being prepared by the server
(:meth:`Engine.incoming`: images being decoded, text tokenized).

Long prompts are prefilled in chunks (``prefill_chunk`` tokens, with the prefix cache on): a
prompt whose uncached part is longer than 1.5 chunks runs one chunk through the LM into the prefix
cache, and its job goes back to the end of the queue, so the requests that came meanwhile run
before its next chunk, and a client that went away stops it at the next chunk. Once the rest fits a
chunk it generates as any job, from the cached prefix (the same output as without chunks: the
cache holds the keys/values one pass would compute). Where the cache cannot keep the prefix (it is
smaller than the prompt's keys/values) the job generates in one pass.

Long generations are cut into slices (``decode_slice`` tokens, with the prefix cache on): once a
batch has generated that many tokens and another request is queued, the batch pauses (its rows keep
their tokens, text and stop-string state; a seeded job its random state), its jobs go back to the end
of the queue, and the queued requests run, a compatible one in the same batch as the paused rows when
they come round: each row continues from its prompt plus what it has generated, whose keys/values
the pause stored in the prefix cache (``keep_generated``), so only its last few tokens (less than a
cache block) run again. The output is the uninterrupted one up to float rounding (those few tokens
are computed in one pass instead of one by one, and with other rows: in bf16 a near-tie can go the
other way, as it can between batch compositions). A seeded job continues with all its rows, finished
ones too, because sampling draws noise for every row of a batch.

The same pause drops finished rows from a batch: ``generate`` computes every row of its batch until
the longest ends, so once half of a batch's rows are done the others pause and continue in a batch of
their own, first in the queue again (with the queued requests that fit; paused rows wait no batching
window) (on the built-in model in bf16, AMD EPYC Zen 4, a step of 8 left-padded rows took ~4x one
row's, of 2 rows ~1.3x). Where the prefix cache cannot keep a paused row's keys/values (too small for them),
its job continues from its prompt once and is not paused again.

Scoring jobs run one at a time on the same worker, between generation batches.

Request threads tokenize with a private copy of the tokenizer each (no lock between requests); a
text is first checked against a sound bound on its length in characters
(:func:`~.tokens.max_chars_per_token`), so a prompt far over the context is refused without tokenizing it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import threading
import time
from typing import Any, Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..modeling.lm_info import lm_context_limit
from ..prefix_cache import PrefixCache
from ..processing import EOC_TOKEN, MEDIA_TOKEN, FlamingoProcessor, cut_at_stop, stop_holdback
from .errors import APIError
from .jobs import ChoiceFinished, Failed, GenerationJob, Job, JobDone, Prompt, Scored, ScoreJob, TokenDelta
from .tokens import max_chars_per_token, max_context_of

log = logging.getLogger("flamingo_vlm.serve")

#: ``--prefix-cache-mb``'s default: room for the keys/values of ~30 4-shot prompts of the built-in model
#: (about 7 MB each in fp32), a few for a 7B LM.
DEFAULT_PREFIX_CACHE_MB = 256
DEFAULT_PREFILL_CHUNK = 2048
DEFAULT_DECODE_SLICE = 32


class _Row:
    """One choice of a job inside a batch: its tokens and text so far, how much of the text has
    gone out, and whether (and why) it is finished."""

    __slots__ = ("job", "choice", "max_tokens", "stop", "tokens", "text", "emitted", "done", "finish")

    def __init__(self, job: GenerationJob, choice: int, max_tokens: int):
        self.job, self.choice, self.max_tokens = job, choice, max_tokens
        self.stop = job.stop
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False
        self.finish: str | None = None


def _continuation(row: _Row) -> Prompt:
    """A paused row's prompt from here on: its job's prompt and what the row has generated."""
    prompt = row.job.prompts[row.choice // row.job.n]
    return Prompt(ids=prompt.ids + row.tokens, images=prompt.images,
                  max_tokens=max(0, row.max_tokens - len(row.tokens)), image_keys=prompt.image_keys)


def _rng_state(device: torch.device) -> dict:
    """The random state sampling draws from on ``device`` (and the CPU's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][1], state["cuda"][0])


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping inside ``generate``: called after every decoding step with all tokens so
    far; decodes each live row's new token, emits text, applies eos / stop strings / max_tokens,
    honours cancellation, and returns which rows are done."""

    def __init__(self, rows: list[_Row], decode: Callable[[list[int]], str], eos_ids: set[int], *,
                 pause_after: int = 0, waiting: Callable[[], bool] | None = None, compact: bool = False):
        self.rows, self.decode, self.eos_ids = rows, decode, eos_ids
        # After ``pause_after`` tokens (0: never), every live row is paused (``paused``; generate
        # stops) as soon as ``waiting()`` says other requests are queued; with ``compact`` also as
        # soon as half the rows are done (generate would go on computing them).
        self.pause_after, self.waiting, self.compact = pause_after, waiting, compact
        self.steps = 0
        self.paused: list[_Row] = []
        self.for_waiting = False  # (paused for queued requests, not only to leave finished rows)
        self._jobs: dict[int, list[_Row]] = {}
        for row in rows:
            self._jobs.setdefault(id(row.job), []).append(row)

    def _emit(self, row: _Row, upto: int) -> None:
        if upto > row.emitted:
            row.job.sink(TokenDelta(row.choice, row.text[row.emitted : upto]))
            row.emitted = upto

    def finish(self, row: _Row, reason: str) -> None:
        if row.done:
            return
        row.done, row.finish = True, reason
        if reason != "cancelled":
            self._emit(row, len(row.text))
            row.job.sink(ChoiceFinished(row.choice, reason, len(row.tokens), row.text))
        job = row.job
        if not job.ended and all(r.done for r in self._jobs[id(job)]):
            # its last choice: the request is answered now, not when the batch's longest row ends
            job.ended = True
            job.sink(JobDone())

    def paused_rows(self) -> list[bool]:
        """Per row, whether it is paused (after ``generate``)."""
        return [row in self.paused for row in self.rows]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for r, row in enumerate(self.rows):
            if row.done:
                continue
            if row.job.cancelled.is_set():
                self.finish(row, "cancelled")
                continue
            token = new[r]
            row.tokens.append(token)
            if token in self.eos_ids:
                self.finish(row, "stop")
                continue
            text = self.decode(row.tokens)
            if row.stop:
                head, stopped = cut_at_stop(text, row.stop)
                if stopped:
                    row.text = head
                    self.finish(row, "stop")
                    continue
            row.text = text
            if len(row.tokens) >= row.max_tokens:
                self.finish(row, "length")
                continue
            safe = len(text)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                safe = len(text.rstrip("\ufffd"))
            if row.stop:
                safe = min(safe, len(text) - stop_holdback(text, row.stop))
            self._emit(row, safe)
        self.steps += 1
        live = [row for row in self.rows if not row.done]
        if live:
            self.for_waiting = bool(self.pause_after and self.steps >= self.pause_after and self.waiting is not None
                                    and self.waiting())
            if self.for_waiting or (self.compact and 2 * len(live) <= len(self.rows)):
                self.paused = live
                return torch.ones(len(self.rows), dtype=torch.bool, device=input_ids.device)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Stats:
    """The engine's counters (batches, rows, tokens, image cache, HTTP responses); read with :meth:`snapshot`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.batches = 0
        self.batch_rows = collections.Counter()  # rows per generate call -> count
        self.batch_jobs = collections.Counter()  # requests per generate call -> count
        self.jobs = 0
        self.rows = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.score_jobs = 0
        self.images_encoded = 0
        self.image_cache_hits = 0
        self.cancelled = 0
        self.prefill_chunks = 0
        self.decode_slices = 0
        self.busy_seconds = 0.0
        self.responses = collections.Counter()  # HTTP status -> count
        self.prefix_cache = None  # the engine's PrefixCache, if on (its own counters)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "batches": self.batches,
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_rows.items())},
                "requests_per_batch_histogram": {str(k): v for k, v in sorted(self.batch_jobs.items())},
                "generation_requests": self.jobs,
                "generated_rows": self.rows,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "score_requests": self.score_jobs,
                "images_encoded": self.images_encoded,
                "image_cache_hits": self.image_cache_hits,
                "cancelled_requests": self.cancelled,
                "prefill_chunks": self.prefill_chunks,
                "decode_slices": self.decode_slices,
                "busy_s": round(self.busy_seconds, 3),
                "responses_by_status": {str(k): v for k, v in sorted(self.responses.items())},
                "prefix_cache": self.prefix_cache.snapshot() if self.prefix_cache is not None else None,
            }


class Engine:
    """Owns the model; serves :class:`GenerationJob` and :class:`ScoreJob` from one worker thread."""

    def __init__(
        self,
        model,
        image_processor,
        tokenizer,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 256,
        max_context: int | None = None,
        image_cache_size: int = 256,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        decode_slice: int = DEFAULT_DECODE_SLICE,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model.eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        limit, _ = lm_context_limit(model.lang_encoder)  # (None: the LM's config names no limit)
        if max_context is not None and limit is not None and max_context > limit:
            raise ValueError(f"max_context (--max-context) {max_context} is more than this model's context of {limit} "
                             f"tokens; give at most {limit}, or leave it out")
        self.max_context = max_context or max_context_of(model, tokenizer)
        self.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
        # what goes between one demonstration's <|endofchunk|> and the next (the model's own; "" for
        # OpenFlamingo's checkpoints): the chat mapping writes it, /v1/models tells the page
        self.demo_separator = model.config.demo_separator
        self.eos_ids = {self.eoc_token_id}
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; a Flamingo tokenizer gets <PAD> from add_flamingo_tokens()")
        self.pad_token_id = tokenizer.pad_token_id
        # Batching of pixels (vision_x) is the processor's; prompts arrive tokenized and are
        # left-padded with the tokenizer's own padding, as the processor does.
        self.processor = FlamingoProcessor(tokenizer, image_processor)
        # Prompts longer than this many characters cannot fit the context whatever they say (None: no
        # such bound for this tokenizer; the request body limit bounds the work then).
        bound = max_chars_per_token(tokenizer)
        self.max_prompt_chars = self.max_context * bound[0] if bound else None
        self._silent_chars = bound[1] if bound else ""
        self.stats = Stats()
        # LM keys/values of prompt prefixes (few-shot demonstrations) shared between requests.
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 disables the prefix cache), got {prefix_cache_mb}")
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.stats.prefix_cache = self.prefix_cache
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: prompts prefill in one pass), got {prefill_chunk}")
        # long prompts prefill this many tokens at a time, other requests served in between
        self.prefill_chunk = prefill_chunk - prefill_chunk % self.prefix_cache.block_size if self.prefix_cache else 0
        if decode_slice < 0:
            raise ValueError(f"decode_slice must be >= 0 (0: a batch generates to its end), got {decode_slice}")
        # a batch that has generated this many tokens pauses for the requests queued meanwhile (its rows
        # continue from the prefix cache: without it, a pause would prefill the whole prompt again)
        self.decode_slice = decode_slice if self.prefix_cache else 0
        # Encodings of recently seen images, by key (few-shot prompts repeat their demos). Only
        # when an image's encoding does not depend on its place among the prompt's images.
        self.image_cache_size = image_cache_size
        self._image_cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._per_image_media = bool(getattr(model, "images_encode_independently", False))
        self._blank_media: torch.Tensor | None = None
        self._idle_since = 0.0
        self._incoming = 0
        # A fast tokenizer's settings are shared state: each request thread encodes with its own copy
        # (no lock, so one long prompt never holds up the others); the worker decodes with the original.
        self._thread_tokenizers = threading.local()
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._running = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._busy = False

    # -- tokenizer / images (called from request threads) ---------------------------------------
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``; safe to call from any number of threads at once."""
        tokenizer = getattr(self._thread_tokenizers, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._thread_tokenizers.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    def surely_over_context(self, text: str) -> bool:
        """True when ``text`` has more tokens than the context holds, told from its length alone
        (see :func:`max_chars_per_token`; False when the tokenizer gives no bound)."""
        if self.max_prompt_chars is None or len(text) <= self.max_prompt_chars:
            return False
        dropped = sum(text.count(c) for c in self._silent_chars)
        return len(text) - dropped > self.max_prompt_chars

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (the worker thread's decoding of generated tokens)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def preprocess(self, image) -> torch.Tensor:
        return self.image_processor(image).unsqueeze(0)  # (F=1, C, H, W)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._cv:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._run, name="flamingo-serve-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._running = False
            pending, self._pending = list(self._pending), collections.deque()
            self._cv.notify_all()
        for job in pending:
            job.sink(Failed(APIError(503, "the server is shutting down", type="server_error", code="shutting_down")))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._running

    def pause(self) -> None:
        """Stop taking jobs from the queue (a running batch finishes); :meth:`resume` continues."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (being prepared) for the block: the batcher waits a little
        longer for it when the batch it is forming is not full."""
        with self._cv:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cv:
                self._incoming -= 1
                self._cv.notify_all()

    def queue_depth(self) -> int:
        with self._cv:
            self._drop_cancelled()
            return len(self._pending)

    def _waiting(self) -> bool:
        """Whether a live request is queued (asked by a generating batch after each slice)."""
        with self._cv:
            return any(not j.cancelled.is_set() for j in self._pending)

    def _drop_cancelled(self) -> None:
        """Drop queued jobs whose clients went away or timed out (call with ``_cv`` held). The worker
        drops them too, but only between batches: until then they held places in ``--max-queue``, and
        a server whose queue had filled with abandoned requests refused live ones with a 503."""
        if any(j.cancelled.is_set() for j in self._pending):
            live = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            with self.stats.lock:
                self.stats.cancelled += len(self._pending) - len(live)
            self._pending = live

    @property
    def busy(self) -> bool:
        return self._busy

    def check_rows(self, rows: int) -> None:
        """A 400 for a request of more rows (prompts x n) than one batch holds (checked before its
        prompts are prepared, and again on submit)."""
        if rows > self.max_batch_size:
            raise APIError(400, f"this request needs {rows} rows (prompts x n), over this server's batch size "
                           f"of {self.max_batch_size}", param="n", code="too_many_choices")

    def submit(self, job: Job) -> None:
        self.check_rows(job.rows)
        with self._cv:
            if not self._running:
                raise APIError(503, "the model worker is not running", type="server_error", code="not_running")
            if len(self._pending) >= self.max_queue:
                self._drop_cancelled()
            if len(self._pending) >= self.max_queue:
                raise APIError(503, f"the server is overloaded ({self.max_queue} requests queued); retry later",
                               type="server_error", code="overloaded")
            job.enqueued_at = time.monotonic()
            self._pending.append(job)
            self._cv.notify_all()

    # -- worker ------------------------------------------------------------------------------------
    def _next_batch(self) -> list | None:
        with self._cv:
            while True:
                while self._running and (self._paused or not self._pending):
                    self._cv.wait()
                if not self._running:
                    return None
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                    with self.stats.lock:
                        self.stats.cancelled += 1
                if not self._pending:
                    continue
                first = self._pending[0]
                # Wait from the oldest job's arrival, or from the end of the last batch if it came
                # during it: the clients just answered are likely to send again within the window.
                deadline = max(first.enqueued_at, self._idle_since) + self.batch_wait
                # While requests are still being prepared (images decoded, text tokenized), wait for
                # them a little longer: up to 4x the window in all.
                patience = deadline + 3 * self.batch_wait
                while self._running and not self._paused:
                    rows = sum(j.rows for j in self._pending if j.key == first.key and not j.cancelled.is_set())
                    now = time.monotonic()
                    if (rows >= self.max_batch_size or first.key[0] in ("score", "seeded")
                            or getattr(first, "resume", None) is not None):  # (paused rows: no window again)
                        break
                    if now >= deadline and (self._incoming == 0 or now >= patience):
                        break
                    self._cv.wait((deadline if now < deadline else patience) - now)
                if not self._running:
                    return None
                if self._paused or first.cancelled.is_set():
                    continue
                batch, keep, rows = [], collections.deque(), 0
                for job in self._pending:
                    if job.cancelled.is_set():
                        with self.stats.lock:
                            self.stats.cancelled += 1
                        continue
                    if job.key == first.key and rows + job.rows <= self.max_batch_size:
                        batch.append(job)
                        rows += job.rows
                    else:
                        keep.append(job)
                self._pending = keep
                return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._busy = True
            start = time.perf_counter()
            try:
                if isinstance(batch[0], ScoreJob):
                    self._score(batch[0])
                else:
                    self._generate(batch)
            except Exception as e:  # a failure answers this batch's requests, the server goes on
                log.exception("batch failed")
                err = e if isinstance(e, APIError) else APIError(
                    500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="internal_error")
                for job in batch:
                    if not getattr(job, "ended", False):  # (a job answered before the failure keeps its answer)
                        job.ended = True
                        job.sink(Failed(err))
            finally:
                self._busy = False
                self._idle_since = time.monotonic()
                with self.stats.lock:
                    self.stats.busy_seconds += time.perf_counter() - start

    def _media(self, image_lists: list[list[torch.Tensor]], key_lists: list[list[str | None]]) -> torch.Tensor:
        """``media`` (B, T_max, M, D) from the model's :meth:`encode_images`: each distinct image
        encoded once per batch, and not at all when its key is in the cache."""
        unique: dict = {}
        for images, keys in zip(image_lists, key_lists):
            for im, key in zip(images, keys):
                unique.setdefault(key if key is not None else ("object", id(im)), im)
        encoded: dict = {}
        todo = []
        for key in unique:
            hit = self._image_cache.get(key) if isinstance(key, str) else None
            if hit is not None:
                self._image_cache.move_to_end(key)
                encoded[key] = hit
            else:
                todo.append(key)
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            pixels = torch.stack([unique[k] for k in chunk]).to(self.device)
            for key, enc in zip(chunk, self.model.encode_images(pixels)):
                encoded[key] = enc
                if isinstance(key, str) and self.image_cache_size > 0:
                    self._image_cache[key] = enc
                    while len(self._image_cache) > self.image_cache_size:
                        self._image_cache.popitem(last=False)
        with self.stats.lock:
            self.stats.images_encoded += len(todo)
            self.stats.image_cache_hits += len(unique) - len(todo)
        # Slots no token looks at (padding, rows without images) are zeros shaped like an encoded
        # image; a batch without any image takes that shape from a blank image, encoded once.
        if encoded:
            like = next(iter(encoded.values()))
        else:
            if self._blank_media is None:
                blank = self.processor.images_tensor([[]])[0].to(self.device)  # (1, F, C, H, W) zeros
                self._blank_media = self.model.encode_images(blank)[0]
            like = self._blank_media
        t_max = max(1, max(len(images) for images in image_lists))
        media = like.new_zeros(len(image_lists), t_max, *like.shape)
        for b, (images, keys) in enumerate(zip(image_lists, key_lists)):
            for t, (im, key) in enumerate(zip(images, keys)):
                media[b, t] = encoded[key if key is not None else ("object", id(im))]
        return media

    def _conditioning_kwargs(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """``media=`` (encoded once per distinct image) when images encode independently, else
        ``vision_x=`` (the processor's batching of the pixels)."""
        image_lists = [p.images for p in prompts]
        if self._per_image_media:
            return {"vision_x": None, "media": self._media(image_lists, [p.keys() for p in prompts])}
        return {"vision_x": self.processor.images_tensor(image_lists).to(self.device)}

    def _left_pad(self, id_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer.pad({"input_ids": id_lists}, padding="longest", padding_side="left",
                                 return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _prefill_in_chunks(self, batch: list[GenerationJob]) -> list[GenerationJob]:
        """Prefill the next chunk of every long prompt in ``batch`` into the prefix cache and put
        those jobs back at the end of the queue (see the module docstring); return the rest, to
        generate now."""
        if not self.prefill_chunk:
            return batch
        now, later = [], []
        for job in batch:
            if job.resume is None and job.prefill_in_chunks and self._prefill_chunk_of(job):
                later.append(job)
            elif job.cancelled.is_set():  # (its client went away during a chunk: no generate for it)
                with self.stats.lock:
                    self.stats.cancelled += 1
            else:
                now.append(job)
        if later:
            with self._cv:
                self._pending.extend(later)  # behind the requests that came meanwhile
                self._cv.notify_all()
        return now

    def _prefill_chunk_of(self, job: GenerationJob) -> bool:
        """One chunk of each of ``job``'s prompts that are still longer than 1.5 chunks past the
        cached prefix; False when none is (or the cache did not keep what was prefilled: then the
        job prefills in one pass from now on)."""
        chunked = False
        for prompt in job.prompts:
            if job.cancelled.is_set():
                return False
            if len(prompt.ids) <= self.prefill_chunk * 3 // 2:
                continue  # (most prompts: no hashing of their blocks on every batch)
            keys = prompt.keys()
            cached = self.prefix_cache.cached_tokens(self.model, prompt.ids, keys)
            if len(prompt.ids) - cached <= self.prefill_chunk * 3 // 2:
                continue
            end = cached - cached % self.prefix_cache.block_size + self.prefill_chunk
            ids = prompt.ids[: end + 1]  # (the cache keeps the blocks before a prompt's last token)
            n = ids.count(self.media_token_id)
            part = Prompt(ids=ids, images=prompt.images[:n], image_keys=keys[:n])
            self.prefix_cache.score(self.model, lang_x=torch.tensor([ids], device=self.device),
                                    candidates=[[self.eoc_token_id]], image_keys=[part.keys()],
                                    **self._conditioning_kwargs([part]))
            with self.stats.lock:
                self.stats.prefill_chunks += 1
            if self.prefix_cache.cached_tokens(self.model, prompt.ids, keys) <= cached:
                log.info("prefix cache too small to prefill job %s in chunks: one pass", job.id)
                job.prefill_in_chunks = False
                return False
            chunked = True
        return chunked

    def _generate(self, batch: list[GenerationJob]) -> None:
        batch = self._prefill_in_chunks(batch)
        if not batch:
            return
        rows, row_prompts = [], []
        for job in batch:
            if job.resume is not None:  # paused choices: their prompts now end with what they generated
                rows += job.resume
                row_prompts += [_continuation(row) for row in job.resume]
                continue
            for p_index, prompt in enumerate(job.prompts):
                for k in range(job.n):
                    rows.append(_Row(job, p_index * job.n + k, prompt.max_tokens))
                    row_prompts.append(prompt)
        fresh = [job for job in batch if job.resume is None]
        done_before = {row for row in rows if row.done}  # (a seeded job's finished choices, see below)
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.batch_rows[len(rows)] += 1
            self.stats.batch_jobs[len(batch)] += 1
            self.stats.jobs += len(fresh)
            self.stats.rows += sum(job.rows for job in fresh)
            self.stats.prompt_tokens += sum(len(p.ids) for job in fresh for p in job.prompts)
        input_ids, mask = self._left_pad([p.ids for p in row_prompts])
        conditioning = self._conditioning_kwargs(row_prompts)
        first = batch[0]
        slicing = self.decode_slice > 0 and all(job.pausable for job in batch)
        # (a seeded job keeps its finished rows, see the module docstring: no compaction for it)
        tracker = RowTracker(rows, self.decode, self.eos_ids, pause_after=self.decode_slice if slicing else 0,
                             waiting=self._waiting, compact=slicing and first.seed is None)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(p.max_tokens for p in row_prompts),
            stopping_criteria=StoppingCriteriaList([tracker]),
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_token_id,
        )
        if first.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
        if first.seed is not None and first.rng_state is not None:  # (a seeded job runs alone; continued, it
            _set_rng_state(first.rng_state)                          # draws on from where it paused)
        elif first.seed is not None:
            torch.manual_seed(first.seed)
        # (should it fail, the jobs not answered yet get the error, from _run)
        if self.prefix_cache is not None:
            self.prefix_cache.generate(self.model, lang_x=input_ids, attention_mask=mask,
                                       image_keys=[p.keys() for p in row_prompts], **conditioning, **kwargs,
                                       keep_generated=tracker.paused_rows)  # (kept: they continue from them)
        else:
            self.model.generate(lang_x=input_ids, attention_mask=mask, **conditioning, **kwargs)
        paused = set(tracker.paused)
        for row in rows:  # rows generate() ended without the tracker (an eos of the LM's own config)
            if not row.done and row not in paused:
                tracker.finish(row, "cancelled" if row.job.cancelled.is_set() else "stop")
        with self.stats.lock:  # (each row's tokens once, when it ends)
            self.stats.generated_tokens += sum(len(r.tokens) for r in rows if r not in paused and r not in done_before)
        again = []
        for job in batch:
            job.resume = [row for row in tracker.paused if row.job is job] or None
            if job.resume is None:
                if not job.ended:  # (each of its rows ended through the tracker, which answered it then)
                    job.ended = True
                    job.sink(JobDone())
                continue
            for row in job.resume:
                prompt = _continuation(row)
                held = self.prefix_cache.cached_tokens(self.model, prompt.ids, prompt.keys())
                if held < len(prompt.ids) - 2 * self.prefix_cache.block_size:
                    # the cache could not keep what it generated (too small for these keys/values):
                    # it continues once, from the whole prompt, and is not paused again
                    log.info("prefix cache too small to pause job %s: it runs to its end", job.id)
                    job.pausable = False
                    break
            if job.seed is not None:
                # Sampling draws noise for every row of the batch, finished or not: a seeded job
                # continues with all its rows (the finished ones ignored), so each live row draws what
                # it would have drawn without the pause.
                job.resume = [row for row in rows if row.job is job]
                job.rng_state = _rng_state(self.device)
            job.enqueued_at = time.monotonic()
            again.append(job)
        if again:
            with self.stats.lock:
                self.stats.decode_slices += len(again)
            with self._cv:
                if tracker.for_waiting:
                    self._pending.extend(again)  # behind the requests that were waiting
                else:  # (only to leave finished rows: first again, the newcomers that fit join it)
                    self._pending.extendleft(reversed(again))
                self._cv.notify_all()

    def _score(self, job: ScoreJob) -> None:
        with self.stats.lock:
            self.stats.score_jobs += 1
            self.stats.prompt_tokens += len(job.prompt.ids)
        input_ids, mask = self._left_pad([job.prompt.ids])
        conditioning = self._conditioning_kwargs([job.prompt])
        score = self.model.score if self.prefix_cache is None else functools.partial(
            self.prefix_cache.score, self.model, image_keys=[job.prompt.keys()])
        scores = score(lang_x=input_ids, candidates=job.candidates, attention_mask=mask,
                       normalize=job.normalize, **conditioning)
        job.sink(Scored(scores[0].tolist()))
        job.sink(JobDone())
