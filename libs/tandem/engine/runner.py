"""The engine on a thread of its own, for servers whose requests arrive on many threads.

`Engine` is not thread-safe, so `EngineRunner` gives it one background thread that takes commands (add,
abort) from a queue and steps while there is work, sleeping on a condition otherwise. Callers get a
`RequestStream` per request. Bad sampling parameters raise in the caller's thread (the engine thread runs
`add_request` and hands its exception back), a full admission queue raises `QueueFull`, and an exception in
the engine thread fails every open stream with `EngineFailed` instead of leaving its reader waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from tandem.engine.engine import Engine, StepOutput
from tandem.engine.handoff import PrefilledSequence
from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.engine.sequence import SpecStats

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The runner already holds its maximum of waiting and running requests."""


class RunnerClosed(RuntimeError):
    """The runner is shutting down or has stopped; it admits no new requests."""


class EngineFailed(RuntimeError):
    """The engine thread raised; every open request fails with this (its cause is the original error)."""


@dataclass(frozen=True, slots=True)
class RunnerStats:
    num_waiting: int  # admitted, not yet scheduled (including those not yet handed to the engine)
    num_running: int
    num_free_blocks: int
    num_blocks: int
    # the engine's speculative-decoding totals since start (Engine.spec_totals)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_drafts_by_position: tuple[int, ...] = ()
    num_accepted_by_position: tuple[int, ...] = ()
    # (smallest batch size of a bucket, drafts per step the speculation policy chose there once it had measured)
    spec_policy_drafts: tuple[tuple[int, int], ...] = ()
    # MTP modules a request joining now should arrive with caught up (Engine.mtp_modules_for_arrival)
    mtp_modules_for_arrival: int = 0


class RequestStream:
    """The StepOutputs of one request, in order; the last has `finished` set.

    Iterating blocks for at most `timeout_s` per output (TimeoutError after that); `get` takes its own timeout
    and returns None when nothing arrived. A cancelled request ends with finish_reason "cancelled"; a failed
    engine raises EngineFailed. The draft counters are updated before each output is delivered.
    """

    def __init__(self, request_id: str, num_prompt_tokens: int, timeout_s: float | None):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.timeout_s = timeout_s
        self.num_completion_tokens = 0
        self.num_draft_tokens = 0
        self.num_accepted_draft_tokens = 0
        self.is_finished = False
        self._spec: SpecStats | None = None  # the engine's counters for this request, read on the engine thread
        self._items: queue.SimpleQueue[StepOutput | BaseException] = queue.SimpleQueue()

    def get(self, timeout: float | None) -> StepOutput | None:
        """The next output, or None if none arrived within `timeout` seconds (None: wait forever). Not to be
        called after the finished output."""
        if self.is_finished:
            raise RuntimeError(f"request {self.request_id}: its stream has already ended")
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self.is_finished = True
            raise item
        self.is_finished = item.finished
        return item

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> StepOutput:
        if self.is_finished:
            raise StopIteration
        out = self.get(self.timeout_s)
        if out is None:
            raise TimeoutError(f"request {self.request_id}: no output within {self.timeout_s}s")
        return out

    # --- the engine thread's side -----------------------------------------------------------------------------
    def _deliver(self, out: StepOutput) -> None:
        self.num_completion_tokens += len(out.new_token_ids)
        if self._spec is not None:
            self.num_draft_tokens, self.num_accepted_draft_tokens = self._spec.draft_tokens, self._spec.accepted_tokens
        self._items.put(out)

    def _fail(self, error: BaseException) -> None:
        self._items.put(error)


class EngineRunner:
    """Owns an Engine and steps it on one background thread; every other method is thread-safe.

    At most `max_queued` requests are admitted (waiting or running) at a time; `submit` raises QueueFull
    beyond that. `stream_timeout_s` is the default per-output timeout of the streams it returns. Both hooks run
    on the engine thread: `on_step(seconds)` after every engine step (keep it cheap), `on_failure(error)` once
    when the engine fails, after every open stream has been failed.
    """

    def __init__(self, engine: Engine, max_queued: int, stream_timeout_s: float | None = 300.0,
                 on_step: Callable[[float], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        if max_queued <= 0:
            raise ValueError(f"max_queued must be positive, got {max_queued}")
        self.engine = engine
        self.max_queued = max_queued
        self.stream_timeout_s = stream_timeout_s
        self.on_step, self.on_failure = on_step, on_failure
        self._cond = threading.Condition()
        self._commands: deque[tuple[str, tuple, Future | None]] = deque()
        self._streams: dict[str, RequestStream] = {}  # admitted and not finished; engine thread removes
        self._admitting = True
        self._stopping = False
        self._error: BaseException | None = None
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="engine-runner", daemon=True)
        self._thread.start()

    # --- callers' side ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               num_speculative_tokens: int | None = None, prefill_only: bool = False,
               mtp_modules: int | None = None) -> RequestStream:
        """Admit a request; raises QueueFull, RunnerClosed, EngineFailed, or SamplingError naming the field.

        A `prefill_only` request's stream yields one output (is_prefilled, or finished if the first token ended
        it); the request then waits for `take_prefilled`. `mtp_modules`: as `Engine.add_request`."""
        stream = RequestStream(request_id, len(prompt_ids), self.stream_timeout_s)
        self._admit(stream, "add", (stream, list(prompt_ids), params, num_speculative_tokens, prefill_only,
                                    mtp_modules))
        return stream

    def submit_prefilled(self, handoff: PrefilledSequence, params: SamplingParams,
                         num_speculative_tokens: int | None = None) -> RequestStream:
        """Admit a request another engine prefilled (`Engine.add_prefilled`); its stream yields the tokens after
        the first. Raises as `submit` does, and OutOfBlocks when the KV pool cannot hold it now."""
        stream = RequestStream(handoff.request_id, len(handoff.prompt_ids), self.stream_timeout_s)
        self._admit(stream, "add_prefilled", (stream, handoff, params, num_speculative_tokens))
        return stream

    def take_prefilled(self, request_id: str) -> PrefilledSequence:
        """`Engine.take_prefilled` on the engine thread: the handoff of a prefilled request, whose blocks are freed
        and whose stream is closed. KeyError if it is not waiting for handoff (e.g. cancelled)."""
        done: Future = Future()
        with self._cond:
            if self._error is not None:
                raise EngineFailed(f"the engine failed: {self._error!r}") from self._error
            self._commands.append(("take", (request_id,), done))
            self._cond.notify()
        return done.result()

    def run_between_steps(self, fn) -> Future:
        """Run `fn()` on the engine thread between two steps (no step in flight); its result or error comes
        through the returned future. For changes the model must see all at once, e.g. a new expert placement."""
        done: Future = Future()
        with self._cond:
            self._check_open()
            self._commands.append(("call", (fn,), done))
            self._cond.notify()
        return done

    def _admit(self, stream: RequestStream, kind: str, args: tuple) -> None:
        done: Future = Future()
        with self._cond:
            self._check_open()
            if stream.request_id in self._streams:
                raise SamplingError(f"request_id {stream.request_id!r} is already running")
            if len(self._streams) >= self.max_queued:
                raise QueueFull(f"the admission queue is full ({self.max_queued} requests waiting or running)")
            self._streams[stream.request_id] = stream
            self._commands.append((kind, args, done))
            self._cond.notify()
        done.result()  # re-raises the engine's error here, in the caller's thread

    def cancel(self, request_id: str) -> None:
        """Abort a request on the engine thread (its KV blocks are freed there at once); its stream ends with
        finish_reason "cancelled". Unknown or finished requests are ignored."""
        with self._cond:
            if request_id in self._streams and not self._stopping:
                self._commands.append(("abort", (request_id,), None))
                self._cond.notify()

    def stats(self) -> RunnerStats:
        """As of the engine thread's last iteration."""
        with self._cond:
            return self._stats

    @property
    def num_open(self) -> int:
        with self._cond:
            return len(self._streams)

    def close(self, grace_s: float = 0.0) -> None:
        """Stop admitting, give open requests up to `grace_s` seconds to finish, cancel the rest (their streams
        end with "cancelled"), then stop the thread."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._admitting = False
            while self._streams and self._error is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            for request_id in list(self._streams):
                self._commands.append(("abort", (request_id,), None))
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineFailed(f"the engine failed: {self._error!r}") from self._error
        if not self._admitting or self._stopping:
            raise RunnerClosed("the engine runner is shutting down")

    # --- the engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not self.engine.has_unfinished:
                        self._cond.wait()
                    commands, self._commands = self._commands, deque()
                    stopping = self._stopping
                for command in commands:
                    self._run_command(*command)
                if stopping:
                    break
                if self.engine.has_unfinished:
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    if self.on_step is not None:
                        self.on_step(time.perf_counter() - started)
                    self._dispatch(outputs)
                with self._cond:
                    self._stats = self._snapshot()
                    self._cond.notify_all()  # close() waits for streams to end
        except BaseException as e:  # noqa: BLE001 - handed to every waiter, never swallowed
            log.exception("engine thread failed")
            self._fail_all(e)
        finally:
            with self._cond:
                self._stats = self._snapshot()
                self._cond.notify_all()

    def _run_command(self, kind: str, args: tuple, done: Future | None) -> None:
        if kind in ("add", "add_prefilled"):
            stream = args[0]
            try:
                if kind == "add":
                    _, prompt_ids, params, num_speculative_tokens, prefill_only, mtp_modules = args
                    self.engine.add_request(prompt_ids, params, stream.request_id, num_speculative_tokens,
                                            prefill_only=prefill_only, mtp_modules=mtp_modules)
                else:
                    self.engine.add_prefilled(*args[1:])
            except Exception as e:  # noqa: BLE001 - re-raised in the submitter's thread
                with self._cond:
                    self._streams.pop(stream.request_id, None)
                done.set_exception(e)
                return
            # the engine drops a request's Sequence once it finishes; keep its draft counters for the stream
            stream._spec = self.engine.spec_stats(stream.request_id)
            done.set_result(None)
        elif kind == "abort":
            (request_id,) = args
            with self._cond:
                stream = self._streams.pop(request_id, None)
            if stream is not None and self.engine.abort(request_id):
                stream._deliver(StepOutput(request_id, [], "", True, "cancelled"))
        elif kind == "call":
            (fn,) = args
            try:
                done.set_result(fn())
            except Exception as e:  # noqa: BLE001 - re-raised by the caller's future
                done.set_exception(e)
        elif kind == "take":
            (request_id,) = args
            try:
                handoff = self.engine.take_prefilled(request_id)
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                done.set_exception(e)
                return
            with self._cond:
                self._streams.pop(request_id, None)
            done.set_result(handoff)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            with self._cond:
                stream = self._streams.get(out.request_id)
                if stream is not None and out.finished:
                    del self._streams[out.request_id]
            if stream is None:
                continue  # cancelled while this step ran
            stream._deliver(out)

    def _fail_all(self, error: BaseException) -> None:
        failure = EngineFailed(f"the engine failed: {error!r}")
        failure.__cause__ = error
        with self._cond:
            self._error = error
            streams, self._streams = list(self._streams.values()), {}
            commands, self._commands = self._commands, deque()
        for stream in streams:
            stream._fail(failure)
        for _, _, done in commands:
            if done is not None and not done.done():
                done.set_exception(failure)
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:  # noqa: BLE001 - the streams are failed already; the hook's error is only logged
                log.exception("the engine runner's on_failure hook failed")

    def _snapshot(self) -> RunnerStats:
        scheduler = self.engine.scheduler
        pending = sum(1 for kind, _, _ in self._commands if kind in ("add", "add_prefilled"))
        spec = self.engine.spec_totals
        return RunnerStats(num_waiting=len(scheduler.waiting) + pending, num_running=len(scheduler.running),
                           num_free_blocks=self.engine.num_free_blocks,
                           num_blocks=self.engine.cache.allocator.num_blocks, num_draft_tokens=spec.draft_tokens,
                           num_accepted_draft_tokens=spec.accepted_tokens,
                           num_drafts_by_position=tuple(spec.proposed_by_position),
                           num_accepted_by_position=tuple(spec.accepted_by_position),
                           spec_policy_drafts=self.engine.policy.settled_choices(),
                           mtp_modules_for_arrival=self.engine.mtp_modules_for_arrival())
