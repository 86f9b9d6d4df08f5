"""The CPU profile served across a real two-node Ray cluster on this box (a head and a second raylet
with its own resources, as Ray's own `ray.cluster_utils.Cluster` does): the SessionHost and the
ReplicaTrainer are placed on the second node, the Ingress on the head, and a conversation and a
replica fit both complete through the one database and replica directory every node shares.

Its own pytest run (scripts/test.sh runs `-m multinode` after the main suite): one process holds one
Ray cluster, and the main suite's is a one-node cluster."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.local_app import cpu_profile_config, free_port, start_local_app
from benchmarks.rtc_client import PresenceRTCClient, speech_pcm48k
from serve_app.db import Store
from tests.test_replicas import person_photo

pytestmark = pytest.mark.multinode
API_KEY = "multinode-key"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    shared = tmp_path_factory.mktemp("shared")
    database_url = f"sqlite:///{shared / 'presence.db'}"
    # Set before the raylets start: their workers inherit it (what ~/.presence_env does on a cluster).
    os.environ["PRESENCE_REPLICAS_DIR"] = str(shared / "replicas")
    os.environ["PRESENCE_ICE_LOOPBACK"] = "1"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "resources": {"head_node": 1}, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2, num_gpus=0, resources={"second_node": 1})
    cluster.wait_for_nodes()
    options = {d["name"]: d.get("ray_actor_options", {}) for d in cpu_profile_config()["applications"][0]["deployments"]}
    on = {"SessionHost": "second_node", "ReplicaTrainer": "second_node", "Ingress": "head_node"}
    placed = {name: {"ray_actor_options": {**options[name], "resources": {node: 0.01}}} for name, node in on.items()}
    base = start_local_app(API_KEY, database_url, max_sessions=2, port=free_port(), deployments=placed,
                           address=cluster.address, timeout_s=300)
    yield base, database_url, shared, second.node_id, cluster.head_node.node_id
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_conversation_and_replica_fit_across_two_nodes(two_nodes, tts):
    base, database_url, shared, second_node, head_node = two_nodes
    h = {"x-api-key": API_KEY}
    with httpx.Client(base_url=base, headers=h, timeout=60) as http:
        r = http.post("/v2/replicas", data={"replica_name": "two-node"},
                      files={"train_video": ("me.png", person_photo(), "image/png")})
        assert r.status_code == 200, r.text
        rid = r.json()["replica_id"]
        deadline = time.time() + 300
        while (got := http.get(f"/v2/replicas/{rid}").json())["status"] == "training" and time.time() < deadline:
            time.sleep(1)
    assert got["status"] == "ready", got
    assert got["trained_on_node"] == second_node != head_node
    head_file = Store(database_url).get_replica(rid).data["head_path"]
    assert Path(head_file).is_relative_to(shared) and Path(head_file).exists()

    async def talk():
        client = PresenceRTCClient(base, API_KEY)
        conv = await client.create(replica_id=rid, conversation_name="two-node")
        await client.connect()
        async with httpx.AsyncClient(base_url=base, headers=h) as http:
            live = (await http.get(f"/v2/conversations/{conv['conversation_id']}")).json()
        since = len(client.events)
        await client.say(speech_pcm48k("What is the capital of France?", tts))
        await client.wait_event("conversation.utterance", timeout=90, since=since, role="replica")
        for _ in range(50):  # the fitted face, loaded from the shared directory, is on the video
            if client.rx.frames >= 5:
                break
            await asyncio.sleep(0.1)
        frames = client.rx.frames
        await client.end()
        await client.wait_event("system.shutdown", timeout=20)
        await client.close()
        return conv["conversation_id"], live, frames

    cid, live, frames = asyncio.run(talk())
    assert live["session_host_node"] == second_node
    assert frames >= 5
    # Written by the SessionHost on the second node, read by the Ingress on the head: one database.
    deadline = time.time() + 10
    while [t["role"] for t in Store(database_url).transcript(cid)][:2] != ["user", "replica"] and time.time() < deadline:
        time.sleep(0.5)
    assert [t["role"] for t in Store(database_url).transcript(cid)][:2] == ["user", "replica"]
    ended = httpx.get(f"{base}/v2/conversations/{cid}", headers=h).json()
    assert ended["status"] == "ended" and ended["transcript"][0]["role"] == "user"
