"""The prefill worker: `tandem serve prefill`.

config -> register with the controller -> (background) model without routed experts, data plane, engine ->
servicer -> health -> serve (see tandem.cluster.worker for start-up, the handoff's wire protocol, and how
a failed engine ends the worker's service: every later call gets UNAVAILABLE naming the cause).

Prefill runs the prompt as a prefill-only request on the engine (batched with the other prompts in flight,
chunked by max_num_batched_tokens), takes the prefilled sequence off the engine (its KV blocks are freed
here) and sends it to the decode rank named in the request under kv_transfer_id; it answers with the first
token only once the decode worker has received everything. The gateway must have opened DecodeWorker.Decode
for that transfer first: the send waits for the decode worker's receive and fails with UNAVAILABLE after
kv_timeout_s. When the first token already ends the request (a stop token, or max_tokens 1) a handoff without
KV still goes out, so the waiting Decode stream ends with that finish reason. A Prefill that fails sends
nothing: the gateway cancels the Decode call it opened.
"""

from __future__ import annotations

import argparse
import os
import threading
import uuid

import grpc

from tandem.cluster.config import add_config_flags, build_config
from tandem.cluster.metrics import ServiceMetrics
from tandem.cluster.worker import WorkerConfig, sampling_params, serve_worker
from tandem.transport.handoff import HandoffSender, HandoffStatus
from tandem.engine.runner import EngineFailed, QueueFull, RunnerClosed
from tandem.engine.sampling import SamplingError
from tandem.transport import TransportError
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc

SERVICE = "prefill"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
POLL_S = 0.1  # how soon a waiting call notices it was cancelled
FINISHED = {"stop": HandoffStatus.STOP, "length": HandoffStatus.LENGTH}


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, worker, metrics: ServiceMetrics):
        self.worker = worker
        self.metrics = metrics
        self._sender: HandoffSender | None = None
        self._lock = threading.Lock()
        self._queued_tokens = 0

    def Prefill(self, request, context):
        with self.metrics.start_call().track(context) as call:
            response = self._prefill(request, context)
            if context.is_active():  # else the gateway gave up and gets no first token
                call.tokens(1)
            return response

    def _prefill(self, request, context):
        runner, plane = self._ready(context)
        roles = plane.roles
        if not 0 <= request.decode_rank < roles.num_attention or request.decode_rank == plane.rank:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"decode_rank {request.decode_rank} is not another attention worker's rank "
                          f"(0 .. {roles.num_attention - 1}, this worker is {plane.rank})")
        try:
            params = sampling_params(request.sampling)
        except SamplingError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
        engine_id = uuid.uuid4().hex  # the gateway's ids are unique per gateway, not across gateways
        prompt = list(request.prompt_token_ids)
        self.metrics.prompt_tokens.inc(len(prompt))
        self._count(len(prompt))
        try:
            try:
                modules = request.num_mtp_modules if request.HasField("num_mtp_modules") else None
                stream = runner.submit(prompt, params, engine_id, request.sampling.num_speculative_tokens,
                                       prefill_only=True, mtp_modules=modules)
            except QueueFull as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except SamplingError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except (RunnerClosed, EngineFailed) as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            out = None
            try:
                while out is None:
                    if not context.is_active():
                        runner.cancel(engine_id)
                        return pb.PrefillResponse()
                    out = stream.get(POLL_S)
            except EngineFailed as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self._count(-len(prompt))
        first_token = out.new_token_ids[0] if out.new_token_ids else -1
        if out.finished and out.finish_reason not in FINISHED:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the prefill ended with {out.finish_reason}")
        handoff = None
        if not out.finished:
            try:
                handoff = runner.take_prefilled(engine_id)
            except KeyError as e:  # cancelled between the step and here
                context.abort(grpc.StatusCode.CANCELLED, str(e))
            except EngineFailed as e:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        status = FINISHED[out.finish_reason] if out.finished else HandoffStatus.CONTINUE
        try:
            self._sender.send(request.decode_rank, request.kv_transfer_id, status, first_token, handoff)
        except TransportError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"KV handoff to rank {request.decode_rank}: {e}")
        return pb.PrefillResponse(first_token_id=first_token)

    def GetLoad(self, request, context):
        runner, _ = self._ready(context)
        with self._lock:
            queued = self._queued_tokens
        return pb.WorkerLoad(num_queued_prompt_tokens=queued, num_running_sequences=runner.stats().num_running)

    def _ready(self, context):
        if not self.worker.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.worker.not_serving_reason())
        with self._lock:  # one sender per process: its lock keeps each handoff's transfers adjacent
            if self._sender is None:
                self._sender = HandoffSender(self.worker.plane, self.worker.config.kv_timeout_s)
        return self.worker.runner, self.worker.plane

    def _count(self, num_tokens: int) -> None:
        with self._lock:
            self._queued_tokens += num_tokens

    def close(self) -> None:
        """Nothing to release: every handoff is sent within its Prefill call."""


def add_servicer(server: grpc.Server, worker, metrics: ServiceMetrics) -> PrefillServicer:
    servicer = PrefillServicer(worker, metrics)
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    return servicer


def serve(config: WorkerConfig) -> int:
    return serve_worker(config, cpb.ROLE_PREFILL, SERVICE_NAME, add_servicer)


def add_prefill_parser(serve_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve prefill`: every WorkerConfig field as a flag; TANDEM_PREFILL_<FIELD> variables override YAML."""
    p = serve_sub.add_parser(SERVICE, help="prefill worker: prompts in, KV caches to the decode workers",
                             description="Run a prefill worker: registers with the controller, joins the data "
                                         "plane, prefills prompts with routed experts on the expert servers and "
                                         "hands their KV caches to decode workers. Settings come from --config "
                                         "YAML < environment (TANDEM_PREFILL_<FIELD>) < flags.")
    add_config_flags(p, WorkerConfig, SERVICE)
    p.set_defaults(func=lambda args: serve(build_config(WorkerConfig, SERVICE, args, os.environ)))
    return p
