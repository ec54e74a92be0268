"""The controller's online expert load balancing: statistics -> plan -> stage -> publish -> acks -> free.

One re-plan, `Rebalancer.rebalance()`:
1. Read the expert load from Redis (the newest `windows` windows, older ones weighted by `decay` per window).
   Redis down: nothing changes, serving goes on with the current placement; the outcome says so and
   `redis_up` turns false until a read succeeds again.
2. Plan with the migration-aware planner from the placement serving now. Applied only if the mean
   balancedness over layers (under the same loads) rises by more than `min_gain`, or `force` is set and the
   plan moves anything.
3. Stage: every expert server loads the experts of its slots in the new placement beside the ones it serves
   (`fleet.stage`). If any server fails, every server drops what it staged and the old placement keeps
   serving: nothing was published.
4. Publish version N+1 in the placement store; the attention workers switch at a step boundary and
   acknowledge it.
5. Once every ready attention worker has acknowledged (or `ack_timeout_s` passes; then at the next re-plan),
   the expert servers free the copies only the old version uses (`fleet.release(N+1)`). Until that is done no
   new version is planned. A staging failure whose clean-up fails too is cleaned up the same way.

Re-plans never overlap (a lock); a background thread runs one every `interval_s` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tandem.cluster.placement_store import PlacementStore
from tandem.eplb.planner import ClusterShape, balancedness, plan_placement
from tandem.moe.placement import Placement

log = logging.getLogger(__name__)


class ExpertFleet(Protocol):
    """What the rebalancer needs of the expert servers and attention workers (the controller implements it
    with gRPC)."""

    def stage(self, placement: Placement) -> None:
        """Every expert server loads its slots of `placement` beside what it serves; raises on any failure."""

    def release(self, keep_version: int) -> None:
        """Every expert server keeps only version `keep_version`: frees what older versions (all workers
        have switched) or a newer staged one (its staging failed) use alone."""

    def attention_members(self) -> set[str]:
        """Member ids of the ready prefill and decode workers (they must acknowledge a new version)."""


@dataclass(frozen=True, slots=True)
class RebalanceSettings:
    shape: ClusterShape
    policy: str = "auto"
    margin: float = 0.0  # a move must lower the worst server's load by more than this fraction
    min_gain: float = 0.01  # apply when mean balancedness rises by more than this
    windows: int = 6  # statistics windows read
    decay: float = 0.8  # weight of a window one older than the next
    interval_s: float = 0.0  # 0: only on demand
    ack_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RebalanceOutcome:
    applied: bool
    reason: str
    version: int  # the placement serving when the re-plan ended
    balancedness_before: float = 0.0
    balancedness_after: float = 0.0
    moved: int = 0  # experts the servers had to load


class Rebalancer:
    def __init__(self, settings: RebalanceSettings, placements: PlacementStore,
                 read_load: Callable[[int, float], np.ndarray], fleet: ExpertFleet):
        self.settings = settings
        self.placements = placements
        self.read_load = read_load
        self.fleet = fleet
        self.redis_up = True
        self.num_applied = 0
        self.num_failed = 0
        self.last: RebalanceOutcome | None = None
        self._lock = threading.Lock()
        self._unreleased: int | None = None  # a version whose old copies are still to be freed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rebalance(self, force: bool = False) -> RebalanceOutcome:
        with self._lock:
            outcome = self._rebalance(force)
            self.last = outcome
            log.info("rebalance: %s (version %d, balancedness %.3f -> %.3f, %d experts moved)", outcome.reason,
                     outcome.version, outcome.balancedness_before, outcome.balancedness_after, outcome.moved)
            return outcome

    def _rebalance(self, force: bool) -> RebalanceOutcome:
        s = self.settings
        self._release_pending()
        current = self.placements.current()
        if self._unreleased is not None:  # never stack versions: a failed staging's clean-up would free copies in use
            return RebalanceOutcome(False, f"waiting until every worker routes with version {self._unreleased} and "
                                           "its old copies are freed", current.version)
        try:
            load = np.asarray(self.read_load(s.windows, s.decay), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - any statistics failure leaves the placement serving
            if self.redis_up:
                log.warning("expert statistics unavailable, keeping placement version %d: %s", current.version, e)
            self.redis_up = False
            return RebalanceOutcome(False, f"statistics unavailable: {e}", current.version)
        if not self.redis_up:
            log.info("expert statistics available again")
        self.redis_up = True
        if load.sum() <= 0:
            return RebalanceOutcome(False, "no expert load recorded yet", current.version)
        phy2log = current.phy2log.numpy()
        before = float(balancedness(load, phy2log, s.shape.slots_per_server).mean())
        plan = plan_placement(load, s.shape, s.policy, previous=phy2log, margin=s.margin)
        after, moved = float(plan.balancedness.mean()), int(plan.moved.sum())
        if moved == 0 or (after - before <= s.min_gain and not force):
            why = "nothing to move" if moved == 0 else f"gain {after - before:.4f} <= min_gain {s.min_gain}"
            return RebalanceOutcome(False, why, current.version, before, after, moved)
        staged = plan.to_placement(current.version + 1)
        try:
            self.fleet.stage(staged)
        except Exception as e:  # noqa: BLE001 - a failed load must leave the old placement serving
            self.num_failed += 1
            log.error("staging placement version %d failed, version %d keeps serving: %s", staged.version,
                      current.version, e)
            try:
                self.fleet.release(current.version)
            except Exception as cleanup:  # noqa: BLE001 - retried at the next re-plan
                log.warning("dropping the partly staged version %d failed (retried at the next re-plan): %s",
                            staged.version, cleanup)
                self._unreleased = current.version
            return RebalanceOutcome(False, f"staging failed: {e}", current.version, before, after, moved)
        version = self.placements.publish(staged.phy2log)
        self.num_applied += 1
        self._unreleased = version
        self._release_pending(wait_s=s.ack_timeout_s)
        return RebalanceOutcome(True, "applied", version, before, after, moved)

    def _release_pending(self, wait_s: float = 0.0) -> None:
        """Free the old copies once every attention worker routes with the newest version."""
        version = self._unreleased
        if version is None:
            return
        deadline = time.monotonic() + wait_s
        while not self.placements.all_acked(version, self.fleet.attention_members()):
            if time.monotonic() >= deadline:
                log.info("placement version %d not yet acknowledged by every worker; old copies stay loaded",
                         version)
                return
            time.sleep(0.05)
        try:
            self.fleet.release(version)
        except Exception as e:  # the new version serves; freeing the old copies is retried at the next re-plan
            log.warning("freeing the copies older than placement version %d failed (retried at the next "
                        "re-plan): %s", version, e)
            return
        self._unreleased = None

    def start(self) -> "Rebalancer":
        if self.settings.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="rebalancer", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.rebalance()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad re-plan
                log.exception("rebalance failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
