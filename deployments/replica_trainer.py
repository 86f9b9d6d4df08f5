"""ReplicaTrainer deployment: fits the stock head to an uploaded photo or video (models/avatar/fit.py)
and writes the replica's head files (3DGS PLY + rig) where SessionHost replicas read them. It returns
the outcome; the ingress, which owns the database, records it.

On a cluster `replicas_dir` must be shared storage (NFS/EFS, or a mounted bucket): a SessionHost on
another node loads the head from there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from ray import serve

from deployments.common import limit_threads, node_id
from models.avatar.fit import fit_head
from models.avatar.head import build_head
from models.avatar.headfile import save_head
from models.media import MediaError, decode_media, probe_media
from models.priority import BACKGROUND_NICE, lower_priority

log = logging.getLogger("presence.replicas")

ROOT = Path(__file__).resolve().parent.parent


def default_replicas_dir() -> Path:
    return Path(os.environ.get("PRESENCE_REPLICAS_DIR", ROOT / "data" / "replicas"))


@serve.deployment
class ReplicaTrainer:
    def __init__(self, replicas_dir: str | None = None, gaussians: int = 20000, rasteriser: str = "reference") -> None:
        """`rasteriser`: "reference" (plain torch on one CPU thread, the CPU profile) or "gsplat" (CUDA;
        the gpu profile: the differentiable phases of a 256^2 photo fit take 0.26 s instead of 34 s on an
        H200 node, benchmarks/results/replica_fit_gpu.json)."""
        if rasteriser not in ("reference", "gsplat"):
            raise ValueError(f"replicas.rasteriser must be 'reference' or 'gsplat', not {rasteriser!r}")
        limit_threads()
        lower_priority(BACKGROUND_NICE)  # no reply waits for a fit
        self.rasteriser = rasteriser
        self.dir = Path(replicas_dir) if replicas_dir else default_replicas_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gaussians = gaussians

    def _fit(self, replica_id: str, data: bytes, content_type: str) -> dict:
        t0 = time.perf_counter()
        frames = decode_media(data, content_type)
        result = fit_head(build_head(self.gaussians), frames, rasteriser=self.rasteriser)
        out = self.dir / replica_id
        out.mkdir(parents=True, exist_ok=True)
        ply, _ = save_head(result.head, out / "head.ply")
        def r(v: float | None, n: int = 2) -> float | None:
            return None if v is None else round(v, n)

        return {"status": "ready", "head_path": str(ply), "psnr_before": r(result.psnr_before),
                "psnr_after": r(result.psnr_after), "psnr_face_before": r(result.psnr_face_before),
                "psnr_face_after": r(result.psnr_face_after),
                "landmark_error_before": r(result.landmark_error_before, 4),
                "landmark_error_after": r(result.landmark_error_after, 4), "shaped": result.shaped,
                "holdout": result.holdout, "gaussians": len(result.head), "frames_used": result.frames_used,
                "frames_held_back": result.frames_held_back, "view_yaws": result.view_yaws,
                "align_score": round(float(min(result.align_scores)), 3) if result.align_scores else None,
                "fit_s": round(time.perf_counter() - t0, 1), "optimise_s": round(result.optimise_s, 2),
                "rasteriser": self.rasteriser, "trained_on_node": node_id()}

    async def probe(self, data: bytes, content_type: str) -> dict:
        """The upload's checks (type, size, duration, pixel caps), here rather than in the ingress: a
        hostile file costs this replica's memory, never the API's. {"ok": True, ...} or {"ok": False, "error"}."""
        try:
            return {"ok": True, **await asyncio.to_thread(probe_media, data, content_type)}
        except MediaError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:  # whatever a decoder raises for a crafted file
            log.warning("probe failed for a %s upload", content_type, exc_info=True)
            return {"ok": False, "error": f"not a usable {content_type} file"}

    async def fit(self, replica_id: str, data: bytes, content_type: str) -> dict:
        """Fit and save the replica's head. Returns {"status": "ready", head_path, psnr_before,
        psnr_after, ...} or {"status": "error", "error": why}; never raises for bad media."""
        try:
            return await asyncio.to_thread(self._fit, replica_id, data, content_type)
        except MediaError as exc:
            return {"status": "error", "error": str(exc)}
        except Exception as exc:  # never leave a replica "training" forever
            log.exception("replica %s: fit failed", replica_id)
            return {"status": "error", "error": f"fit failed ({type(exc).__name__})"}
