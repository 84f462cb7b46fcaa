"""Which instance should run which pull stream: pure functions of one instance's view of the cluster, so every
instance, from the same view, reaches the same answer (and tests need no NATS). Deciding is not acquiring: the lease
(streamguard/cluster/leases.py) settles who actually runs a stream, so a stale or differing view costs at most a
refused create, never two runners.

Rules, for each registered stream nobody holds, oldest first:
- its assigned instance (the least loaded one when it was registered) takes it;
- while that instance is live, the others leave it alone for `grace_s` (it is starting it);
- otherwise (it is gone, or did not take it in time) the least loaded live instance takes it, ties broken by id;
  if that one has not taken it `grace_s` later, any instance may.
A stream that runs is never moved: an instance that joins or comes back gets new and orphaned streams first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from streamguard.cluster.members import MemberState
from streamguard.cluster.registry import Registration


@dataclass(frozen=True, slots=True)
class View:
    me: str
    live: Mapping[str, MemberState]  # live instances (this one included) and what they last said
    registry: Mapping[str, Registration]
    mine: frozenset[str]  # leases this instance holds (its own truth, fresher than its published state)
    unowned_since: Mapping[str, float]  # monotonic, when each unheld stream was first seen unheld
    now: float
    grace_s: float


def holders(view: View) -> dict[str, str]:
    """stream id -> the live instance that says it holds its lease."""
    out = {sid: instance for instance, state in view.live.items() if instance != view.me for sid in state.owned}
    out.update({sid: view.me for sid in view.mine})
    return out


def loads(view: View, held: Mapping[str, str]) -> dict[str, int]:
    """Pull streams per live instance: those it holds, and those placed on it that nobody holds yet."""
    out = dict.fromkeys(view.live, 0)
    for sid, registration in view.registry.items():
        instance = held.get(sid) or registration.assigned
        if instance in out:
            out[instance] += 1
    return out


def least_loaded(load: Mapping[str, int]) -> str:
    return min(load, key=lambda instance: (load[instance], instance))


def place(live: Iterable[str], load: Mapping[str, int]) -> str:
    """Where a new stream goes: the least loaded live instance."""
    return least_loaded({i: load.get(i, 0) for i in live})


def to_acquire(view: View) -> list[str]:
    """The unheld streams this instance should try to take now, in order."""
    held = holders(view)
    load = loads(view, held)
    out: list[str] = []
    for sid, registration in sorted(view.registry.items(), key=lambda kv: (kv[1].created_at, kv[0])):
        if sid in held:
            continue
        waited = view.now - view.unowned_since.get(sid, view.now)
        assigned = registration.assigned
        if assigned == view.me:
            chosen = view.me
        elif assigned in view.live and waited < view.grace_s:
            continue
        else:
            # Counted on the instance it leaves now, and on the one that should take it (the same one in every
            # instance's view), so the next orphan goes elsewhere.
            if assigned in load:
                load[assigned] -= 1
            chosen = least_loaded(load)
            load[chosen] += 1
        if chosen == view.me or waited >= 2 * view.grace_s:
            out.append(sid)
    return out


def orphans(view: View) -> set[str]:
    """Registered streams nobody live holds (for `unowned_since`)."""
    held = holders(view)
    return {sid for sid in view.registry if sid not in held}
