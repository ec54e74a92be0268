"""The decode worker: `tandem serve decode`.

config -> register with the controller -> (background) model without routed experts, data plane, engine ->
servicer -> health -> serve (see tandem.cluster.worker for start-up, the handoff's wire protocol, and how
a failed engine ends the worker's service: every later call gets UNAVAILABLE naming the cause).

Decode announces (prefill_rank, kv_transfer_id) to the worker's `HandoffInbox`, which posts the receive from
that prefill rank; only then may the gateway call PrefillWorker.Prefill (so the gateway opens this stream
first). When the handoff arrives (within kv_timeout_s, else UNAVAILABLE) its KV is written into this engine's
cache (`Engine.add_prefilled`: blocks are allocated then, RESOURCE_EXHAUSTED if the pool cannot hold it) and
the sequence joins the running batch; the stream carries the tokens after the first as they are accepted,
with the MTP draft and accepted counts of each step, and the last message the finish reason. A handoff that
says the first token already finished the request ends the stream with that reason and no tokens. Cancel, or
the gateway cancelling the call, aborts the sequence on the engine at once, freeing its KV blocks.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field

import grpc

from tandem.cluster.config import add_config_flags, build_config
from tandem.cluster.metrics import ServiceMetrics
from tandem.cluster.worker import WorkerConfig, sampling_params, serve_worker
from tandem.transport.handoff import HandoffInbox, HandoffStatus
from tandem.engine.kv_cache import OutOfBlocks
from tandem.engine.runner import EngineFailed, QueueFull, RunnerClosed
from tandem.engine.sampling import SamplingError
from tandem.transport import TransportError
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc

SERVICE = "decode"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
POLL_S = 0.1  # how soon a waiting call notices it was cancelled
FINISH_REASONS = {"stop": gpb.FINISH_REASON_STOP, "length": gpb.FINISH_REASON_LENGTH,
                  "cancelled": gpb.FINISH_REASON_CANCELLED}
HANDOFF_REASONS = {HandoffStatus.STOP: gpb.FINISH_REASON_STOP, HandoffStatus.LENGTH: gpb.FINISH_REASON_LENGTH}


@dataclass(slots=True)
class _Call:
    """A Decode call in flight, so that Cancel finds it whether it waits for its KV or runs."""

    cancelled: threading.Event = field(default_factory=threading.Event)


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(self, worker, metrics: ServiceMetrics):
        self.worker = worker
        self.metrics = metrics
        self._inbox: HandoffInbox | None = None
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}

    def Decode(self, request, context):
        # per sequence: its first token here is the request's second (the prefill worker made the first)
        return self.metrics.start_call().stream(context, self._decode_call(request, context))

    def _decode_call(self, request, context):
        runner, plane = self._ready(context)
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if not request.prompt_token_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if not 0 <= request.prefill_rank < plane.roles.num_attention or request.prefill_rank == plane.rank:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prefill_rank {request.prefill_rank} is not another attention worker's rank "
                          f"(0 .. {plane.roles.num_attention - 1}, this worker is {plane.rank})")
        try:
            params = sampling_params(request.sampling)
        except SamplingError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
        call = _Call()
        with self._lock:
            if request.request_id in self._calls:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request.request_id!r} is already running")
            self._calls[request.request_id] = call
        try:
            yield from self._decode(request, params, call, runner, context)
        finally:
            with self._lock:
                self._calls.pop(request.request_id, None)

    def _decode(self, request, params, call: _Call, runner, context):
        rid, src, transfer_id = request.request_id, request.prefill_rank, request.kv_transfer_id
        try:
            future = self._inbox.expect(src, transfer_id)
        except TransportError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deadline = time.monotonic() + self.worker.config.kv_timeout_s
        try:
            while not future.done():
                if not context.is_active():
                    return
                if call.cancelled.is_set():
                    yield pb.DecodeResponse(finish_reason=gpb.FINISH_REASON_CANCELLED)
                    return
                if time.monotonic() > deadline:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer {transfer_id} from prefill rank {src} did "
                                                               f"not arrive within {self.worker.config.kv_timeout_s}s")
                try:
                    future.result(POLL_S)
                except TimeoutError:
                    pass
                except TransportError as e:
                    context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            if not future.done():
                self._inbox.forget(src, transfer_id)
        handoff = future.result()
        if handoff.status is not HandoffStatus.CONTINUE:
            yield pb.DecodeResponse(finish_reason=HANDOFF_REASONS[handoff.status])
            return
        try:
            stream = runner.submit_prefilled(handoff.to_prefilled(rid, request.prompt_token_ids), params,
                                             request.sampling.num_speculative_tokens)
        except (QueueFull, OutOfBlocks) as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except SamplingError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RunnerClosed, EngineFailed) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if not context.add_callback(lambda: runner.cancel(rid)) or call.cancelled.is_set():
            runner.cancel(rid)  # the call ended, or Cancel came, before the callback could be registered
        try:
            yield from self._responses(stream, context)
        finally:
            if not stream.is_finished:
                runner.cancel(rid)

    def _responses(self, stream, context):
        num_drafts = num_accepted = 0
        while context.is_active():
            try:
                out = stream.get(POLL_S)
            except EngineFailed as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            if out is None:
                continue
            drafts, accepted = stream.num_draft_tokens - num_drafts, stream.num_accepted_draft_tokens - num_accepted
            num_drafts, num_accepted = stream.num_draft_tokens, stream.num_accepted_draft_tokens
            reason = FINISH_REASONS.get(out.finish_reason, gpb.FINISH_REASON_UNSPECIFIED) if out.finished else None
            if out.new_token_ids or drafts or reason is not None:
                yield pb.DecodeResponse(token_ids=out.new_token_ids, num_draft_tokens=drafts,
                                        num_accepted_draft_tokens=accepted, finish_reason=reason)
            if out.finished:
                return

    def Cancel(self, request, context):
        runner, _ = self._ready(context)
        with self._lock:
            call = self._calls.get(request.request_id)
        if call is None:
            return pb.CancelResponse(is_found=False)
        call.cancelled.set()
        runner.cancel(request.request_id)
        return pb.CancelResponse(is_found=True)

    def GetLoad(self, request, context):
        runner, _ = self._ready(context)
        stats = runner.stats()
        return pb.WorkerLoad(num_running_sequences=stats.num_running, num_free_kv_blocks=stats.num_free_blocks,
                             num_kv_blocks=stats.num_blocks, num_mtp_modules_wanted=stats.mtp_modules_for_arrival)

    def _ready(self, context):
        if not self.worker.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.worker.not_serving_reason())
        with self._lock:
            if self._inbox is None:
                self._inbox = HandoffInbox(self.worker.plane)
        return self.worker.runner, self.worker.plane

    def close(self) -> None:
        """End the handoff receive threads (see HandoffInbox.close)."""
        with self._lock:
            if self._inbox is not None:
                self._inbox.close()


def add_servicer(server: grpc.Server, worker, metrics: ServiceMetrics) -> DecodeServicer:
    servicer = DecodeServicer(worker, metrics)
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    return servicer


def serve(config: WorkerConfig) -> int:
    return serve_worker(config, cpb.ROLE_DECODE, SERVICE_NAME, add_servicer)


def add_decode_parser(serve_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve decode`: every WorkerConfig field as a flag; TANDEM_DECODE_<FIELD> variables override YAML."""
    p = serve_sub.add_parser(SERVICE, help="decode worker: continues requests from handed-over KV caches",
                             description="Run a decode worker: registers with the controller, joins the data "
                                         "plane, receives prefilled KV caches and generates with MTP speculative "
                                         "decoding, routed experts on the expert servers. Settings come from "
                                         "--config YAML < environment (TANDEM_DECODE_<FIELD>) < flags.")
    add_config_flags(p, WorkerConfig, SERVICE)
    p.set_defaults(func=lambda args: serve(build_config(WorkerConfig, SERVICE, args, os.environ)))
    return p
