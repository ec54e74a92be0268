"""Expert-load statistics against a real redis-server: exact counts, decay, expiry, and a Redis outage."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tandem.eplb.stats import ExpertLoadRecorder, connect, read_load, window_key, windows_key

L, E = 3, 8  # MoE layers, logical experts


class Clock:
    """Test time: starts at the beginning of a real window (Redis expiry is absolute, so near real time)."""

    def __init__(self, window_s: float):
        self.t = math.floor(time.time() / window_s) * window_s + 0.1

    def __call__(self) -> float:
        return self.t


def random_counts(generator: torch.Generator) -> torch.Tensor:
    """Tokens per expert of one step, with zeros (experts that got nothing write no field)."""
    counts = torch.randint(0, 50, (E,), generator=generator)
    return counts * (torch.rand(E, generator=generator) < 0.6)


def record(recorder: ExpertLoadRecorder, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Add `steps` steps of random counts for every layer; returns their [L, E] sum."""
    total = torch.zeros(L, E, dtype=torch.int64)
    for _ in range(steps):
        for layer in range(L):
            counts = random_counts(generator)
            recorder.add(layer, counts)
            total[layer] += counts
    return total


def test_counts_over_flushes_and_windows_read_back_exactly(redis_server, request):
    client, model = connect(redis_server), request.node.name
    clock = Clock(window_s=60)
    recorder = ExpertLoadRecorder(client, model, window_s=60, retention_s=600, clock=clock)
    generator = torch.Generator().manual_seed(0)

    first = record(recorder, 3, generator)
    assert recorder.flush()
    first += record(recorder, 4, generator)  # same window, second flush
    assert recorder.flush()
    clock.t += 60
    second = record(recorder, 5, generator)
    recorder.add(0, torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32))  # any integer dtype
    second[0, 0] += 1
    assert recorder.flush() and recorder.is_connected and recorder.num_failed_flushes == 0
    assert recorder.flush()  # nothing pending: a no-op

    assert torch.equal(read_load(client, model, L, E, windows=2, decay=1.0), (first + second).double())
    assert torch.equal(read_load(client, model, L, E, windows=1, decay=1.0), second.double())
    assert torch.equal(read_load(client, model, L, E, windows=2, decay=0.5), second.double() + 0.5 * first.double())

    # the schema: one hash per window with a field per non-zero (layer, expert), ids in the sorted set
    window = math.floor(clock.t / 60)
    fields = client.hgetall(window_key(model, window))
    assert fields == {f"{l}:{e}".encode(): str(int(second[l, e])).encode()
                      for l in range(L) for e in range(E) if second[l, e]}
    assert [int(w) for w in client.zrange(windows_key(model), 0, -1)] == [window - 1, window]


def test_read_load_with_nothing_recorded_is_zero(redis_server):
    assert torch.equal(read_load(connect(redis_server), "no-such-model", L, E, windows=4),
                       torch.zeros(L, E, dtype=torch.float64))


def test_read_load_rejects_counts_outside_the_shape(redis_server, request):
    client, model = connect(redis_server), request.node.name
    recorder = ExpertLoadRecorder(client, model)
    recorder.add(L, torch.ones(E, dtype=torch.int64))  # a fourth layer
    assert recorder.flush()
    with pytest.raises(ValueError, match="layer 3"):
        read_load(client, model, L, E, windows=1)


def test_background_thread_flushes(redis_server, request):
    client, model = connect(redis_server), request.node.name
    recorder = ExpertLoadRecorder(client, model)
    recorder.start(interval_s=0.05)
    recorder.add(1, torch.arange(E))
    deadline = time.monotonic() + 5
    while read_load(client, model, L, E, windows=1).sum() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    recorder.stop()
    assert torch.equal(read_load(client, model, L, E, windows=1)[1], torch.arange(E).double())


def test_keys_expire_after_retention(redis_server, request):
    client, model = connect(redis_server), request.node.name
    recorder = ExpertLoadRecorder(client, model, window_s=0.5, retention_s=0.5)  # real clock
    recorder.add(0, torch.ones(E, dtype=torch.int64))
    assert recorder.flush()
    keys = client.zrange(windows_key(model), 0, -1)
    assert len(keys) == 1
    key = window_key(model, int(keys[0]))
    assert 0 < client.pttl(key) <= 1000 and 0 < client.pttl(windows_key(model)) <= 1000
    time.sleep(1.1)
    assert not client.exists(key, windows_key(model))
    assert read_load(client, model, L, E, windows=10).sum() == 0


def test_redis_outage_keeps_counts_and_sends_them_after_restart(redis_process, request, caplog):
    client, model = connect(redis_process.url), request.node.name
    clock = Clock(window_s=60)
    recorder = ExpertLoadRecorder(client, model, window_s=60, retention_s=600, clock=clock)
    generator = torch.Generator().manual_seed(1)
    record(recorder, 2, generator)
    assert recorder.flush()  # these die with the server: it keeps nothing on disk

    redis_process.stop()
    kept = record(recorder, 3, generator)
    started = time.monotonic()
    assert not recorder.flush()  # neither raises nor blocks
    clock.t += 60  # the outage spans a window boundary
    kept_next = record(recorder, 2, generator)
    assert not recorder.flush()
    assert time.monotonic() - started < 2
    assert not recorder.is_connected and recorder.num_failed_flushes == 2
    assert recorder.num_pending_windows == 2
    assert sum("Redis unavailable" in r.message for r in caplog.records) == 1  # logged once

    redis_process.start()  # same port, empty: no persistence
    assert recorder.flush() and recorder.is_connected and recorder.num_pending_windows == 0
    assert torch.equal(read_load(client, model, L, E, windows=2), (kept + kept_next).double())
    assert torch.equal(read_load(client, model, L, E, windows=1), kept_next.double())


def test_outage_drops_windows_beyond_the_bound(redis_process, request):
    client, model = connect(redis_process.url), request.node.name
    clock = Clock(window_s=60)
    recorder = ExpertLoadRecorder(client, model, window_s=60, retention_s=600, max_pending_windows=2, clock=clock)
    redis_process.stop()
    for step in range(4):
        recorder.add(0, torch.full((E,), step + 1))
        assert not recorder.flush()
        clock.t += 60
    assert recorder.num_pending_windows == 2 and recorder.num_dropped_windows == 2
    redis_process.start()
    assert recorder.flush()
    assert torch.equal(read_load(client, model, L, E, windows=10)[0], torch.full((E,), 3.0 + 4.0, dtype=torch.float64))
