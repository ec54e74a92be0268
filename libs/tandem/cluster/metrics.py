"""Prometheus metrics of the gateway and the prefill and decode workers.

Each service owns a `ServiceMetrics`, whose `CollectorRegistry` is its own (never prometheus_client's global
one, so several services in one process keep apart) and is served over HTTP when the service has a metrics
port. Call metrics are recorded by the servicers as each call runs (`CallMetrics`); gauges and the engine's
counters are read at scrape time from state the engine thread publishes (`EngineRunner.stats()`, the expert
exchanges' `ExchangeTime`). The engine thread touches one metric itself: it observes each step's duration
(`EngineTimings`, one locked add per step). No `service` label: one registry per service.

  tandem_requests_total{code}                   calls ended, by gRPC status code (OK, CANCELLED, UNAVAILABLE ...)
  tandem_time_to_first_token_seconds            a call's arrival -> the first token it returns (at the gateway:
                                                as the client sees it; on a decode worker: per sequence, the
                                                request's second token, since the prefill worker made the first)
  tandem_inter_token_latency_seconds            between consecutive returned tokens; tokens that go out in one
                                                message (accepted drafts) share the gap since the previous one
  tandem_request_latency_seconds                a call's arrival -> its end (at the gateway: end to end)
  tandem_prompt_tokens_total                    prompt tokens of the calls admitted (gateway, prefill)
  tandem_generation_tokens_total                tokens returned to callers
  tandem_queue_requests{state}                  waiting / running requests
  tandem_kv_blocks_used, tandem_kv_blocks_total  the engine's KV-cache pool (prefill, decode, colocated gateway)
  tandem_spec_draft_tokens_total, tandem_spec_accepted_tokens_total     MTP drafts verified, and accepted
  tandem_spec_draft_tokens_by_position_total{position},
  tandem_spec_accepted_tokens_by_position_total{position}               the same per draft position (from 0;
                                                                        where an engine runs)
  tandem_spec_policy_drafts{batch_from}         drafts per step the speculation policy chose last in a batch-size
                                                bucket (batch_from = its smallest size: 1, 2, 4, 8, ...), once it
                                                measured every draft count there; 0 = speculation off
  tandem_engine_step_seconds{phase}             one engine step (schedule, forward with its expert exchanges,
                                                sampling, MTP drafting); phase: prefill or decode (the worker's
                                                role), colocated (a gateway's own engine)
  tandem_expert_exchange_seconds_total, tandem_expert_exchanges_total   an attention worker's time blocked in
                                                expert exchanges (grouping and posting its tokens, waiting for
                                                and combining the replies; see tandem.transport.expert_dispatch),
                                                and how many (one per MoE layer per forward)
Per engine step, then: step time = exchange time (of which the expert servers' own compute,
tandem_expert_compute_seconds_total on each expert server, by source rank) + the worker's own compute
(attention, dense layers, shared experts, router, sampling, drafting) and its bookkeeping.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from tandem.engine.runner import EngineRunner

if TYPE_CHECKING:
    from tandem.transport.expert_dispatch import ExchangeTime

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServiceMetrics:
    """One service's registry and call metrics; `serve` exports the registry on an HTTP port."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests", "Calls ended, by gRPC status code", ["code"], registry=r)
        self.time_to_first_token = Histogram("tandem_time_to_first_token_seconds",
                                             "Seconds from a call's arrival to the first token it returns",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("tandem_inter_token_latency_seconds",
                                             "Seconds between consecutive tokens a call returns",
                                             buckets=ITL_BUCKETS, registry=r)
        self.request_latency = Histogram("tandem_request_latency_seconds",
                                         "Seconds from a call's arrival to its end", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of the calls admitted", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens returned to callers", registry=r)
        self._http = None

    def start_call(self) -> CallMetrics:
        return CallMetrics(self)

    def serve(self, host: str, port: int) -> None:
        """Export the registry at http://host:port/metrics (on a daemon thread)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class CallMetrics:
    """The timings of one call, from its arrival: `tokens(n)` as tokens go out, then the call's end once
    (`track` or `stream` record that with the call's status)."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics
        self.started = time.monotonic()
        self._last_token: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        m, now = self.metrics, time.monotonic()
        m.generation_tokens.inc(n)
        if self._last_token is None:
            m.time_to_first_token.observe(now - self.started)
        else:
            gap = (now - self._last_token) / n
            for _ in range(n):
                m.inter_token_latency.observe(gap)
        self._last_token = now

    @contextmanager
    def track(self, context: grpc.ServicerContext) -> Iterator[CallMetrics]:
        """Record the call's end and status code when the block exits, however it exits."""
        error = None
        try:
            yield self
        except BaseException as e:  # counted by its status, then re-raised
            error = e
            raise
        finally:
            self.metrics.requests.labels(call_status(context, error).name).inc()
            self.metrics.request_latency.observe(time.monotonic() - self.started)

    def stream(self, context: grpc.ServicerContext, responses: Iterator) -> Iterator:
        """Pass a response stream through (its messages carry `token_ids`), timing its tokens."""
        with self.track(context):
            try:
                for message in responses:
                    self.tokens(len(message.token_ids))
                    yield message
            finally:
                responses.close()  # its own cleanup runs now, not when it is garbage collected


def call_status(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: what the handler aborted with, else CANCELLED or DEADLINE_EXCEEDED when
    the client went away, else UNKNOWN for an exception and OK."""
    if context.code() is not None:
        return context.code()
    if isinstance(error, GeneratorExit) or not context.is_active():
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class EngineTimings:
    """The engine steps' durations, `phase` naming what the engine does (prefill, decode); `observe` is the
    runner's on_step hook."""

    def __init__(self, metrics: ServiceMetrics, phase: str):
        self.step_seconds = Histogram("tandem_engine_step_seconds", "Seconds one engine step takes", ["phase"],
                                      buckets=STEP_BUCKETS, registry=metrics.registry).labels(phase)

    def observe(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)


# --- state read at scrape time ------------------------------------------------------------------------------
def _queue(num_waiting: int, num_running: int) -> GaugeMetricFamily:
    queue = GaugeMetricFamily("tandem_queue_requests", "Requests waiting and running", labels=["state"])
    queue.add_metric(["waiting"], num_waiting)
    queue.add_metric(["running"], num_running)
    return queue


def _speculation(num_drafts: int, num_accepted: int) -> Iterator[CounterMetricFamily]:
    yield CounterMetricFamily("tandem_spec_draft_tokens", "MTP draft tokens verified", value=num_drafts)
    yield CounterMetricFamily("tandem_spec_accepted_tokens", "MTP draft tokens accepted", value=num_accepted)


class EngineCollector:
    """Queue, KV-cache pool and speculative-decoding counters of an engine, from its runner's last published
    stats; nothing until `runner()` returns one (a worker still loading)."""

    def __init__(self, runner: Callable[[], EngineRunner | None]):
        self.runner = runner

    def collect(self):
        runner = self.runner()
        if runner is None:
            return
        s = runner.stats()
        yield _queue(s.num_waiting, s.num_running)
        yield GaugeMetricFamily("tandem_kv_blocks_used", "KV-cache blocks held by requests",
                                value=s.num_blocks - s.num_free_blocks)
        yield GaugeMetricFamily("tandem_kv_blocks_total", "KV-cache blocks in the pool", value=s.num_blocks)
        yield from _speculation(s.num_draft_tokens, s.num_accepted_draft_tokens)
        drafts = CounterMetricFamily("tandem_spec_draft_tokens_by_position", "MTP draft tokens verified, by "
                                     "position in the draft (from 0)", labels=["position"])
        accepted = CounterMetricFamily("tandem_spec_accepted_tokens_by_position", "MTP draft tokens accepted, by "
                                       "position in the draft (from 0)", labels=["position"])
        for position, (n, a) in enumerate(zip(s.num_drafts_by_position, s.num_accepted_by_position)):
            drafts.add_metric([str(position)], n)
            accepted.add_metric([str(position)], a)
        yield drafts
        yield accepted
        policy = GaugeMetricFamily("tandem_spec_policy_drafts", "MTP drafts per step the speculation policy chose "
                                   "last, by batch-size bucket (batch_from: its smallest batch size), once measured "
                                   "there; 0 = speculation off", labels=["batch_from"])
        for batch_from, k in s.spec_policy_drafts:
            policy.add_metric([str(batch_from)], k)
        yield policy


class WorkerBackendCollector:
    """A gateway in front of workers: its requests waiting (for workers, or for their first token) and running
    (streaming from a decode worker), and the draft counts the decode workers reported for them."""

    def __init__(self, backend):
        self.backend = backend  # a tandem.gateway.workers.WorkerBackend

    def collect(self):
        s = self.backend.stats()
        yield _queue(s.num_waiting, s.num_running)
        yield from _speculation(s.num_draft_tokens, s.num_accepted_draft_tokens)


class ExchangeCollector:
    """An attention worker's time in expert exchanges, from the `ExchangeTime` its RemoteExperts add to; nothing
    until `timer()` returns one (a worker still loading)."""

    def __init__(self, timer: Callable[[], ExchangeTime | None]):
        self.timer = timer

    def collect(self):
        timer = self.timer()
        if timer is None:
            return
        seconds, count = timer.seconds, timer.count
        yield CounterMetricFamily("tandem_expert_exchange_seconds", "Seconds the engine spent in expert exchanges "
                                  "(posting tokens to the expert servers, waiting for and combining the replies)",
                                  value=seconds)
        yield CounterMetricFamily("tandem_expert_exchanges", "Expert exchanges (one per MoE layer per forward)",
                                  value=count)


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A metrics endpoint's samples, {name{label="value",...}: value} (labels sorted; no braces without)."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples

