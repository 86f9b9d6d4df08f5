"""How a session host tells a dead model replica from a slow one, from Ray's own state.

Two sources: the GCS's named actors, which drop a killed replica within milliseconds, and Serve's
status, which says (a second or more later) whether a deployment has a RUNNING replica again. The
replicas a host has seen running are remembered; when none of them is alive any more, the stage is down
until Serve reports it running again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError

from serve_app.session.recovery import StageHealth

STATUS_TTL_S = 0.25  # many sessions asking at once share one controller call
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<id>


class ServeStageHealth:
    def __init__(self) -> None:
        self._status: Any = None
        self._at = 0.0
        self._lock = asyncio.Lock()
        self.known: dict[tuple[str, str], set[str]] = {}  # (app, deployment) -> replica actors seen running
        self._relearning: set[tuple[str, str]] = set()

    async def _serve_status(self) -> Any:
        async with self._lock:
            if self._status is None or time.monotonic() - self._at > STATUS_TTL_S:
                self._status = await asyncio.to_thread(serve.status)
                self._at = time.monotonic()
            return self._status

    @staticmethod
    async def _alive(app: str, deployment: str) -> set[str]:
        prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        return {a["name"] for a in named if a["name"].startswith(prefix)}

    async def learn(self, handles: list[Any]) -> None:
        """Remember the stages' running replicas (call while they are up, e.g. as a session starts)."""
        for handle in handles:
            await self.is_down(handle)  # never raises; learns the replicas when Serve says all run

    async def is_down(self, handle: Any) -> bool:
        """The handle's stage has no live replica now (it died and is restarting)."""
        try:
            key = (handle.app_name, handle.deployment_name)
            alive = await self._alive(*key)
            known = self.known.get(key)
            if known is not None:
                if known & alive:
                    return False
                # Every replica seen running is gone: down, at GCS speed. Serve's slower status says
                # when the restarted one runs (then it is known, and the stage is up again).
                if key not in self._relearning:
                    self._relearning.add(key)
                    asyncio.ensure_future(self._relearn(key))
                return True
            return await self._down_by_status(key, alive)
        except Exception:  # noqa: BLE001 - no answer is no evidence of an outage
            return False

    async def _down_by_status(self, key: tuple[str, str], alive: set[str]) -> bool:
        states = (await self._serve_status()).applications[key[0]].deployments[key[1]].replica_states
        running = sum(n for state, n in states.items() if str(state).endswith("RUNNING"))
        if running and running == sum(states.values()) and alive:
            self.known[key] = alive
            return False
        return running == 0

    async def _relearn(self, key: tuple[str, str]) -> None:
        try:
            await self._down_by_status(key, await self._alive(*key))
        except Exception:  # noqa: BLE001 - asked again at the next is_down
            pass
        finally:
            self._relearning.discard(key)

    def health(self) -> StageHealth:
        return StageHealth(lost=(RayActorError,), is_down=self.is_down)
