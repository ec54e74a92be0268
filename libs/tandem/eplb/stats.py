"""Expert-load statistics in Redis: expert servers count the tokens each logical expert receives; the
controller reads them back over a sliding window with exponential decay to plan the placement.

Key schema (one model's statistics; `{model}` is the served model's name, `{window}` a window id):

    tandem:{model}:expert_load:{window}    hash  field "{layer}:{expert}" -> tokens (HINCRBY)
    tandem:{model}:expert_load:windows     sorted set of the window ids written (member = score = id)

- `window = floor(unix_time / window_s)`: the time window the tokens arrived in. Every expert server adds
  into the same hash, so a hash holds the cluster's total for that window.
- `layer` is the MoE layer index (0 = the first MoE layer, the row of `Placement.phy2log`), `expert` the
  logical expert id; both decimal. Only (layer, expert) pairs that received tokens have a field.
- Each window's hash expires `retention_s` after its window ends (PEXPIREAT, absolute, so every writer
  agrees); the sorted set drops ids older than that and expires with the newest window. Redis memory stays
  at about (retention_s / window_s) x layers x experts fields per model.

Writing is one MULTI/EXEC pipeline per flush (one HINCRBY per non-zero (layer, expert, window), never one
per token): all of a flush lands or none of it. Should the connection drop after Redis applied a flush but
before its reply arrived, the retry counts that flush twice; that is the only way a count can be wrong.

Serving never waits for Redis: `ExpertLoadRecorder.add` only adds tensors in memory, and `flush` (from a
background thread) keeps the counts when Redis is unavailable and sends them once it is back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def key_prefix(model: str) -> str:
    return f"tandem:{model}:expert_load"


def window_key(model: str, window: int) -> str:
    return f"{key_prefix(model)}:{window}"


def windows_key(model: str) -> str:
    return f"{key_prefix(model)}:windows"


def connect(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A Redis client that fails fast: bounded connect and socket timeouts and no client-side retries (the
    recorder retries at its next flush), so a dead or unreachable Redis costs a flush at most `timeout_s`."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0))


class ExpertLoadRecorder:
    """Counts tokens per (MoE layer, logical expert) in memory and adds them to Redis on `flush`.

    Thread-safe: serving threads call `add`, one background thread (`start`/`stop`) or the caller calls
    `flush`. Counts that could not be sent are kept, for at most `max_pending_windows` windows (default:
    the retention) and never past the retention (Redis would expire them at once).
    """

    def __init__(self, redis_client: redis.Redis, model: str, window_s: float = 10.0, retention_s: float = 3600.0,
                 max_pending_windows: int | None = None, clock: Callable[[], float] = time.time):
        if window_s <= 0 or retention_s <= 0:
            raise ValueError(f"window_s and retention_s must be > 0, got {window_s} and {retention_s}")
        self.redis = redis_client
        self.model = model
        self.window_s = window_s
        self.retention_s = retention_s
        self.max_pending_windows = max_pending_windows or math.ceil(retention_s / window_s) + 1
        self.clock = clock
        self.num_failed_flushes = 0
        self.num_dropped_windows = 0  # windows given up: past retention, or beyond max_pending_windows
        self.is_connected = True  # the last flush reached Redis (optimistic until one fails)
        self._lock = threading.Lock()  # guards _pending; held only to add or swap, never during I/O
        self._flush_lock = threading.Lock()  # one flush at a time; guards _unsent
        self._pending: dict[int, dict[int, torch.Tensor]] = {}  # window -> layer -> [E] int64, caller's device
        self._unsent: dict[int, dict[int, torch.Tensor]] = {}  # the same on CPU, waiting for Redis
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, layer: int, counts: torch.Tensor) -> None:
        """Add `counts` [E] (tokens per logical expert of MoE layer `layer`) to the current window.
        Never touches Redis and never synchronises a GPU: counts stay on their device until `flush`."""
        if counts.dim() != 1:
            raise ValueError(f"counts must be [num_experts], got shape {tuple(counts.shape)}")
        window = self._window(self.clock())
        with self._lock:
            layers = self._pending.setdefault(window, {})
            if layer in layers:
                layers[layer].add_(counts.to(torch.int64))
            else:
                layers[layer] = counts.to(torch.int64, copy=True)

    def flush(self) -> bool:
        """Send every count not yet in Redis in one pipeline. Returns whether Redis took them; on failure
        they are kept for the next flush (and the first failure after a success is logged)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            for window, layers in pending.items():
                kept = self._unsent.setdefault(window, {})
                for layer, counts in layers.items():
                    counts = counts.cpu()
                    kept[layer] = kept[layer] + counts if layer in kept else counts
            now = self.clock()
            self._drop_expired(now)
            if not self._unsent:
                return True
            try:
                self._send(now)
            except redis.RedisError as e:
                self.num_failed_flushes += 1
                if self.is_connected:
                    log.warning("expert-load statistics: Redis unavailable (%s); keeping counts and retrying", e)
                self.is_connected = False
                return False
            if not self.is_connected:
                log.info("expert-load statistics: Redis is back; sent the kept counts")
            self.is_connected = True
            self._unsent = {}
            return True

    def start(self, interval_s: float = 1.0) -> None:
        """Flush every `interval_s` seconds from a daemon thread until `stop`."""
        if self._thread is not None:
            raise RuntimeError("recorder already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="expert-load-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the flush thread, then flush once more (best effort)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.flush()

    @property
    def num_pending_windows(self) -> int:
        """Windows with counts not yet in Redis (waits for a flush in progress)."""
        with self._flush_lock, self._lock:
            return len(self._unsent.keys() | self._pending.keys())

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # a bug here must not end the statistics for the life of the server
                log.exception("expert-load statistics: flush failed")

    def _window(self, t: float) -> int:
        return math.floor(t / self.window_s)

    def _expiry_ms(self, window: int) -> int:
        """When a window's hash expires: `retention_s` after the window ends (unix ms)."""
        return math.ceil(((window + 1) * self.window_s + self.retention_s) * 1000)

    def _drop_expired(self, now: float) -> None:
        now_ms = now * 1000
        expired = [w for w in self._unsent if self._expiry_ms(w) <= now_ms]
        overflow = sorted(self._unsent.keys() - set(expired))[:-self.max_pending_windows]
        for window in expired + overflow:
            del self._unsent[window]
        if expired or overflow:
            self.num_dropped_windows += len(expired) + len(overflow)
            log.warning("expert-load statistics: dropped %d windows of counts Redis never took",
                        len(expired) + len(overflow))

    def _send(self, now: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        windows = windows_key(self.model)
        for window, layers in sorted(self._unsent.items()):
            key = window_key(self.model, window)
            for layer, counts in sorted(layers.items()):
                experts = counts.nonzero().flatten().tolist()
                for expert, n in zip(experts, counts[experts].tolist()):
                    pipe.hincrby(key, f"{layer}:{expert}", n)
            pipe.pexpireat(key, self._expiry_ms(window))
            pipe.zadd(windows, {str(window): window})
        oldest_live = math.floor((now - self.retention_s) / self.window_s)
        pipe.zremrangebyscore(windows, "-inf", f"({oldest_live}")
        pipe.pexpireat(windows, self._expiry_ms(max(max(self._unsent), self._window(now))))
        pipe.execute()


def read_load(redis_client: redis.Redis, model: str, num_layers: int, num_experts: int, windows: int,
              decay: float = 1.0) -> torch.Tensor:
    """The load of each logical expert, [L, E] float64: sum over the newest `windows` time windows of
    tokens x decay**age, where age is how many windows older than the newest recorded window one is (the
    newest weighs 1; windows without traffic count as empty). All zeros when nothing is recorded.

    Raises redis.RedisError when Redis is unavailable (the caller keeps its last placement), and ValueError
    when Redis holds a layer or expert outside [L, E] (statistics of another model under the same name).
    """
    if windows < 1 or not 0 < decay <= 1:
        raise ValueError(f"windows must be >= 1 and decay in (0, 1], got {windows} and {decay}")
    load = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    newest = redis_client.zrevrange(windows_key(model), 0, 0)
    if not newest:
        return load
    newest_id = int(newest[0])
    ids = [int(w) for w in redis_client.zrangebyscore(windows_key(model), newest_id - windows + 1, newest_id)]
    pipe = redis_client.pipeline(transaction=False)
    for window in ids:
        pipe.hgetall(window_key(model, window))
    for window, fields in zip(ids, pipe.execute()):
        weight = decay ** (newest_id - window)
        for field, count in fields.items():
            layer, expert = (int(x) for x in field.split(b":" if isinstance(field, bytes) else ":"))
            if not (0 <= layer < num_layers and 0 <= expert < num_experts):
                raise ValueError(f"{window_key(model, window)} has layer {layer}, expert {expert}: outside "
                                 f"{num_layers} MoE layers x {num_experts} experts")
            load[layer, expert] += weight * int(count)
    return load
