"""The capacity planner's queueing math and packing, as pure functions."""

from __future__ import annotations

import math

import pytest

from benchmarks.plan import GPU_FIXED_MS, GPU_HOST, GPU_STAGES, erlang_c, pack, plan, wait_p95_ms

H100X8 = {"instance": "p5.48xlarge", "gpus": 8, "cpus": 192, "usd_per_hour": 55.04}


def test_erlang_c_matches_closed_forms():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at a = 1
    assert erlang_c(4, 0.0) == 0.0 and erlang_c(3, 3.0) == 1.0


def test_wait_tail_shrinks_with_servers_and_explodes_at_saturation():
    # M/M/1, lambda 8/s, mu 10/s: P(W > t) = 0.8 exp(-2t) -> t95 = ln(16) / 2 s.
    assert wait_p95_ms(8.0, 100.0, 1) == pytest.approx(1000 * math.log(16) / 2)
    assert wait_p95_ms(8.0, 100.0, 2) < wait_p95_ms(8.0, 100.0, 1)
    assert wait_p95_ms(10.0, 100.0, 1) == math.inf


def test_pack_first_fit():
    items = [("LLM", 0.4, 2)] * 3 + [("SessionHost", 0.125, 2)] * 8
    assert pack(items, {"gpus": 1, "cpus": 16}) == 3
    assert pack(items, H100X8) == 1
    with pytest.raises(ValueError):
        pack([("big", 2.0, 1)], {"gpus": 1, "cpus": 16})


def test_session_host_gpu_fraction_covers_its_rendering():
    frame_s = GPU_HOST["sessions_per_host"] * GPU_HOST["fps"] * GPU_HOST["render_ms_per_frame"] / 1000
    assert frame_s <= GPU_HOST["gpu"] + 1e-9


def test_plan_grows_with_load_and_meets_the_slo():
    small = plan(100, 600, GPU_STAGES, GPU_FIXED_MS, GPU_HOST, H100X8)
    big = plan(1000, 600, GPU_STAGES, GPU_FIXED_MS, GPU_HOST, H100X8)
    assert small["meets_slo"] and big["meets_slo"] and big["predicted_p95_ms"] <= 600
    assert big["nodes"] > small["nodes"] and big["replicas"]["SessionHost"] > small["replicas"]["SessionHost"]
    assert all(u < 1 for u in big["utilisation"].values())
    assert big["usd_per_session_minute"] == pytest.approx(big["usd_per_hour"] / 60 / 1000, rel=1e-3)
    impossible = plan(100, 200, GPU_STAGES, GPU_FIXED_MS, GPU_HOST, H100X8)  # below the unloaded path
    assert not impossible["meets_slo"]
