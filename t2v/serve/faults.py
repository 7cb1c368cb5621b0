"""Why a job failed, told to its user, and which failures are tried again: a replica that died, or that went
silent in the middle of a job (ReplicaStalled)."""

from __future__ import annotations

import asyncio
import re

from ..errors import InputError, StorageError


# Ray's errors for an actor (a Serve replica) that died or became unreachable, by name: the service itself
# runs without Ray too. A RayTaskError made from one subclasses it, so the names are looked for in the MRO.
REPLICA_DIED = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaStalled"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ReplicaStalled(TimeoutError):
    """A replica that went silent in the middle of a job's stream: retried as a dead one is."""


async def until_stalled(stream, stall_timeout_s: float):
    """A job's stream of events, ended by ReplicaStalled when the next event does not come within
    stall_timeout_s of the last. The first may take longer: a job can wait behind others for a replica.
    An answer lost between replicas would otherwise keep its job in progress until the service restarts."""
    iterator, next_event = aiter(stream), None
    try:
        event = await anext(iterator)
        while True:
            yield event
            # asyncio.wait, not wait_for: a TimeoutError the replica raised is its own error, not a stall
            next_event = asyncio.ensure_future(anext(iterator))
            if not (await asyncio.wait({next_event}, timeout=stall_timeout_s))[0]:
                raise ReplicaStalled(f"no word from the replica in {stall_timeout_s} s (stall_timeout_s)")
            event = next_event.result()
    except StopAsyncIteration:
        return
    finally:  # stalled, or the job cancelled while waiting: stop waiting
        if next_event is not None and not next_event.done():
            next_event.cancel()


def seconds(field: str, value) -> float:
    """A timeout setting (window_timeout_s, stall_timeout_s): a number of seconds > 0, or InputError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(field, f"is {value!r}", "a number of seconds > 0")
    return float(value)


def replica_died(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if REPLICA_DIED & {k.__name__ for k in type(e).__mro__}:
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


def failure(e: BaseException) -> dict:
    """A failed job's error for its user: a stable code and one clean line. Internal errors tell nothing of
    their text (it carries pids, addresses, tracebacks, terminal colours): that goes to the log only."""
    cause = getattr(e, "cause", None)  # a replica's own exception arrives inside Ray's task error
    if isinstance(e, InputError) or isinstance(cause, InputError):
        text = ANSI.sub("", str(e if isinstance(e, InputError) else cause)).strip()
        return {"code": "invalid_value", "message": text.splitlines()[0][:500] if text else "invalid request"}
    if replica_died(e):
        return {"code": "replica_died", "message": "the server running this job stopped; submit it again"}
    if isinstance(e, StorageError) or isinstance(cause, StorageError):
        return {"code": "storage_error", "message": "the video could not be stored; submit it again"}
    return {"code": "internal_error", "message": "the job failed on an internal error; submit it again"}
