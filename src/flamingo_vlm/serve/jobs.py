"""What passes between the HTTP layer and the :class:`~.engine.Engine`: jobs in, events out.

A request becomes a job (:class:`GenerationJob` or :class:`ScoreJob`) carrying its tokenized
prompts (:class:`Prompt`) and a *sink*: a callable the engine's worker thread calls with events:

* :class:`TokenDelta`: new text of one choice (generation; streamed as it is decoded),
* :class:`ChoiceFinished`: one choice is complete (its reason, token count and whole text),
* :class:`Scored`: the candidates' log-likelihoods (scoring),
* :class:`JobDone`: the job is over (after all its choices or its scores),
* :class:`Failed`: the job failed (or the server is shutting down); nothing follows it.

A job ends with one :class:`JobDone` or :class:`Failed`, unless it was cancelled (a cancelled job
left in the queue gets no event; a cancelled choice gets no :class:`ChoiceFinished`). The sink runs
on the worker thread, so it must only hand the event over (the app puts it on the request's event
loop, :class:`~.channel.Channel`).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .errors import APIError

_job_ids = itertools.count(1)


# -- events (engine -> HTTP layer) ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenDelta:
    """New text of choice ``choice`` (held back while it could still start a stop string)."""

    choice: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    """Choice ``choice`` is complete: why (``stop`` / ``length``), its token count and its text."""

    choice: int
    reason: str
    tokens: int
    text: str


@dataclass(frozen=True)
class Scored:
    """The log-likelihood of each candidate of a :class:`ScoreJob`, in the candidates' order."""

    scores: list[float]


@dataclass(frozen=True)
class JobDone:
    """The job is over; nothing follows."""


@dataclass(frozen=True)
class Failed:
    """The job failed with ``error`` (what the client gets); nothing follows."""

    error: APIError


Event = Union[TokenDelta, ChoiceFinished, Scored, JobDone, Failed]
Sink = Callable[[Event], None]


# -- jobs (HTTP layer -> engine) -----------------------------------------------------------------------
@dataclass
class Prompt:
    """One tokenized prompt and its preprocessed images ((F, C, H, W) tensors, in marker order).
    ``image_keys`` (e.g. a hash of each image's bytes) let the engine reuse an image's encoding
    across rows and requests; ``None`` entries are encoded every time."""

    ids: list[int]
    images: list[torch.Tensor]
    max_tokens: int = 16
    image_keys: list[str | None] | None = None

    def keys(self) -> list[str | None]:
        return list(self.image_keys) if self.image_keys is not None else [None] * len(self.images)


@dataclass
class GenerationJob:
    """Generate ``n`` choices for each prompt (choice ``p * n + k`` is prompt ``p``'s ``k``-th)."""

    prompts: list[Prompt]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    sink: Sink = lambda event: None
    id: int = field(default_factory=lambda: next(_job_ids))
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prefill_in_chunks: bool = True  # (the engine's: False once the prefix cache could not keep a chunk)
    # (the engine's: the choices paused mid-generation to let queued requests run, continued when the
    # job comes round again, and the random state of a seeded job at the pause)
    resume: list | None = None
    rng_state: dict | None = None
    ended: bool = False  # (the engine's: JobDone or Failed sent)
    pausable: bool = True  # (the engine's: False once the prefix cache could not keep a paused row's tokens)

    @property
    def rows(self) -> int:
        return len(self.resume) if self.resume is not None else len(self.prompts) * self.n

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        if self.seed is not None:
            return ("seeded", self.id)
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", float(self.temperature), float(self.top_p))

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class ScoreJob:
    """Score each candidate (token ids) as a continuation of ``prompt``; always runs alone."""

    prompt: Prompt
    candidates: list[list[int]]
    normalize: bool = False
    sink: Sink = lambda event: None
    id: int = field(default_factory=lambda: next(_job_ids))
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    rows = 1

    @property
    def key(self) -> tuple:
        return ("score", self.id)

    def cancel(self) -> None:
        self.cancelled.set()


Job = Union[GenerationJob, ScoreJob]
