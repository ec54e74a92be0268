"""The expert server's side of the expert exchange (protocol in tandem.transport.expert_dispatch)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from tandem.moe.experts import ExpertBank
from tandem.transport.group import DataPlane
from tandem.transport.wire import (IDLE_WAIT, Deadline, Kind, Tag, TransportError, code_dtype, empty_header,
                                   make_header, post_recv, post_send, wait)

log = logging.getLogger(__name__)

TokenCounter = Callable[[int, torch.Tensor], None]  # (layer, tokens per logical expert [E] int64 on CPU)


class ExpertWorker:
    """Serves expert requests from the attention workers with the banks this server holds.

    banks: {layer: ExpertBank of this server's local slots}; phy2log: {layer: [num_slots] logical expert of
    each local slot}, both of placement `version`. After each request, on_tokens(layer, counts [num_logical])
    gets the tokens each logical expert received, for the load statistics.

    Placement changes: `add_version` stages a newer version's banks beside the ones serving (requests name
    their version, see tandem.transport.expert_dispatch); `keep_only` frees every other version once the
    attention workers have switched (or drops a staged one whose switch was called off).

    `serve_forever` listens to each attention rank on its own thread with a receive from that rank only, not
    a receive from any rank: with gloo, a peer whose connection resets (a killed process) also fails any-source
    receives posted elsewhere in the group, even from ranks that never talk to it, and re-posting one could
    swallow a live peer's message. Per-source receives keep a dead peer's failure on its own connection.
    Computing (and on_tokens) is serialised; the exchanges overlap.

    `compute_seconds[src]` and `num_computed[src]`: the time spent running the expert FFNs (and counting their
    tokens) for attention rank src's requests, not receiving or replying, and how many requests, since start;
    written under the compute lock, read without it (metrics scrapes).
    """

    def __init__(self, plane: DataPlane, banks: dict[int, ExpertBank], phy2log: dict[int, torch.Tensor],
                 num_logical: int, on_tokens: TokenCounter | None = None, timeout_s: float | None = None,
                 version: int = 0):
        if plane.roles is None:
            raise ValueError("ExpertWorker needs a DataPlane joined with roles (to know the attention ranks)")
        self.plane = plane
        # version -> (banks, phy2log); replaced as a whole, never mutated, so a reader needs no lock
        self._versions: dict[int, tuple[dict[int, ExpertBank], dict[int, torch.Tensor]]] = {}
        self.add_version(version, banks, phy2log)
        self.num_logical = num_logical
        self.on_tokens = on_tokens
        self.timeout_s = plane.timeout_s if timeout_s is None else timeout_s
        self.num_served = 0
        self.failed_peers: dict[int, str] = {}  # attention rank -> why its connection was given up
        attention = [plane.roles.attention_rank(i) for i in range(plane.roles.num_attention)]
        self.compute_seconds: dict[int, float] = dict.fromkeys(attention, 0.0)
        self.num_computed: dict[int, int] = dict.fromkeys(attention, 0)
        self._compute_lock = threading.Lock()

    @property
    def versions(self) -> list[int]:
        """Placement versions held, oldest first."""
        return sorted(self._versions)

    def banks(self, version: int | None = None) -> dict[int, ExpertBank]:
        """{layer: bank} of `version` (default: the newest held)."""
        return self._versions[max(self._versions) if version is None else version][0]

    def phy2log(self, version: int | None = None) -> dict[int, torch.Tensor]:
        """{layer: [num_slots] logical expert of each local slot} of `version` (default: the newest held)."""
        return self._versions[max(self._versions) if version is None else version][1]

    def add_version(self, version: int, banks: dict[int, ExpertBank], phy2log: dict[int, torch.Tensor]) -> None:
        """Hold placement `version`'s banks beside the others (requests of that version can come at once)."""
        for layer, bank in banks.items():
            if layer not in phy2log or phy2log[layer].shape != (bank.num_slots,):
                raise ValueError(f"MoE layer {layer}: need phy2log of shape ({bank.num_slots},) for its bank")
        if version in self._versions:
            raise ValueError(f"placement version {version} is already loaded")
        tables = {layer: table.to(torch.int64).cpu() for layer, table in phy2log.items()}
        self._versions = {**self._versions, version: (banks, tables)}

    def keep_only(self, version: int) -> int:
        """Free every version but `version`; returns how many versions were freed. A request still naming a
        freed version gets EXPERT_ERROR (the controller frees a version only after every worker left it)."""
        if version not in self._versions:
            raise KeyError(f"placement version {version} is not loaded (loaded: {self.versions})")
        freed = len(self._versions) - 1
        self._versions = {version: self._versions[version]}
        return freed

    def drop_version(self, version: int) -> None:
        """Free a staged version that will not be used (a newer one than any worker routes with)."""
        if version not in self._versions or len(self._versions) == 1:
            raise KeyError(f"placement version {version} is not a staged version (loaded: {self.versions})")
        self._versions = {v: held for v, held in self._versions.items() if v != version}

    def serve_one(self, src: int) -> bool:
        """Wait (indefinitely) for the next message from attention rank src and answer it.

        Returns False on a shutdown message, True after answering a request. Raises TransportError when the
        exchange with src fails; gloo errors stick to a connection, so nothing more can come from src.
        """
        group, device = self.plane.expert_group, self.plane.device
        header = empty_header(device)
        what = f"expert server waiting for a request from rank {src}"
        wait(post_recv(header, src, group, Tag.REQUEST_HEADER, what), IDLE_WAIT, what)
        kind, layer, num_rows, num_pairs, seq, hidden, x_code, w_code, version = header.tolist()
        if kind == Kind.SHUTDOWN:
            return False
        if kind != Kind.EXPERT_REQUEST:
            # the sizes of whatever follows are unknown, so this connection cannot be resynchronised
            raise TransportError(f"expert server: unexpected message kind {kind} from rank {src}")
        self._answer(src, layer, num_rows, num_pairs, seq, hidden, code_dtype(x_code), code_dtype(w_code), version)
        return True

    def serve_forever(self, stop_event: threading.Event) -> None:
        """Serve every attention rank until each has sent a shutdown message (see `stop_expert_server`) or
        failed, or until stop_event is set (returns then; threads blocked in a receive are daemons and end
        with the process)."""
        threads = [threading.Thread(target=self._serve_peer, args=(src, stop_event), daemon=True,
                                    name=f"expert-server-from-rank-{src}")
                   for src in map(self.plane.roles.attention_rank, range(self.plane.roles.num_attention))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and not stop_event.wait(0.05):
            pass

    def _serve_peer(self, src: int, stop_event: threading.Event) -> None:
        try:
            while not stop_event.is_set() and self.serve_one(src):
                pass
        except TransportError as e:
            log.warning("expert server stops serving rank %d: %s", src, e)
            self.failed_peers[src] = str(e)

    def _answer(self, src: int, layer: int, num_rows: int, num_pairs: int, seq: int, hidden: int,
                x_dtype: torch.dtype, w_dtype: torch.dtype, version: int) -> None:
        # R rows, P (row, expert) pairs, D hidden
        group, device = self.plane.expert_group, self.plane.device
        deadline = Deadline(self.timeout_s)
        what = f"expert server receiving request {seq} (MoE layer {layer}) from rank {src}"
        x = torch.empty(num_rows, hidden, dtype=x_dtype, device=device)
        pairs = torch.empty(2, num_pairs, dtype=torch.int64, device=device)
        weights = torch.empty(num_pairs, dtype=w_dtype, device=device)
        recvs = [post_recv(t, src, group, tag, what) for t, tag in
                 ((x, Tag.REQUEST_ROWS), (pairs, Tag.REQUEST_PAIRS), (weights, Tag.REQUEST_WEIGHTS))]
        for work in recvs:
            wait(work, deadline.remaining(), what)
        with self._compute_lock:
            try:
                out, kind = self._run(layer, version, x, pairs, weights, src), Kind.EXPERT_RESULT
            except Exception:  # reported to the sender as EXPERT_ERROR, which fails its request
                log.exception("request %d (MoE layer %d, placement version %d) from rank %d failed", seq, layer,
                              version, src)
                out, kind = torch.zeros_like(x), Kind.EXPERT_ERROR
            self.num_served += 1
        reply = make_header(kind, layer, num_rows, num_pairs, seq, device=device)
        what = f"expert server replying to request {seq} (MoE layer {layer}) of rank {src}"
        sends = [post_send(reply, src, group, Tag.RESULT_HEADER, what),
                 post_send(out, src, group, Tag.RESULT_ROWS, what)]
        for work in sends:
            wait(work, deadline.remaining(), what)

    def _run(self, layer: int, version: int, x: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor,
             src: int) -> torch.Tensor:
        """x [R, D], pairs [2, P] (row, local slot), weights [P] -> [R, D] weighted sums per row."""
        started = time.perf_counter()
        if version not in self._versions:
            raise KeyError(f"placement version {version} is not loaded (loaded: {self.versions})")
        banks, phy2log = self._versions[version]
        bank = banks[layer]
        row_of_pair, slot = pairs
        per_pair = bank(x[row_of_pair], slot[:, None], weights[:, None])  # [P, D]
        out = torch.zeros_like(x).index_add_(0, row_of_pair, per_pair)
        if self.on_tokens is not None:
            per_slot = torch.bincount(slot, minlength=bank.num_slots).cpu()
            counts = torch.zeros(self.num_logical, dtype=torch.int64).index_add_(0, phy2log[layer], per_slot)
            self.on_tokens(layer, counts)
        # no sync of its own: on a GPU the counts' .cpu() above waits for the FFN kernels (without on_tokens the
        # time is the launches', and the rest lands in the reply's send)
        self.compute_seconds[src] += time.perf_counter() - started
        self.num_computed[src] += 1
        return out


def stop_expert_server(plane: DataPlane, server_rank: int, timeout_s: float | None = None) -> None:
    """Tell an expert server this rank is done: it stops listening to this rank after the requests sent before."""
    header = make_header(Kind.SHUTDOWN, device=plane.device)
    what = f"stopping expert server rank {server_rank}"
    with plane.expert_lock:
        work = post_send(header, server_rank, plane.expert_group, Tag.REQUEST_HEADER, what)
    wait(work, Deadline(plane.timeout_s if timeout_s is None else timeout_s).remaining(), what)
