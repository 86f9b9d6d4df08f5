"""What a session is asked to do: the spec the ingress sends a SessionHost (typed, validated once by
the API's pydantic models) and the numbers the session's parts read from it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from models.llm import GenerationParams
from serve_app.schemas import ConversationProperties, PersonaIn
from serve_app.session.recovery import StageHealth

PATIENCE_S = {"low": 0.6, "medium": 1.1, "high": 2.0}  # silence after which an "incomplete" turn is taken anyway
INTERRUPT_AFTER_S = {"low": 0.9, "medium": 0.45, "high": 0.2}  # user speech needed before a barge-in check


@dataclass
class Handles:
    """The shared model deployments a session calls (Serve handles, or fakes in unit tests)."""

    turn: Any
    asr: Any
    llm: Any
    tts: Any
    perception: Any = None  # None: no visual perception
    knowledge: Any = None  # the Knowledge deployment (None: no knowledge base)
    health: StageHealth = field(default_factory=StageHealth)  # how a dead replica is told from a slow one
    # POSTs JSON under the outbound-HTTP policy: (url, body) -> (status, body). LLM tool deliveries use it.
    post_json: Callable[[str, dict], Awaitable[tuple[int, bytes]]] | None = None


@dataclass
class SessionSpec:
    """One conversation as the ingress hands it to a SessionHost."""

    conversation_id: str
    offer_sdp: str
    persona: PersonaIn
    properties: ConversationProperties = field(default_factory=ConversationProperties)
    conversational_context: str = ""
    custom_greeting: str | None = None
    ice_servers: list[dict] = field(default_factory=list)
    replica_head: str | None = None  # a fitted replica's head file (None: the stock head)
    video_mode: str | None = None  # "client" | "server" as the conversation or persona asks; None: the host's default
    replica_id: str = "r-stock"
    head_version: str = ""  # content hash of the head file the browser fetches in client mode
    # What the joined client may send on the data channel (schemas.PARTICIPANT_GRANTS / OPERATOR_GRANTS).
    grants: frozenset[str] = frozenset({"respond", "interrupt"})
    callback_url: str | None = None  # the conversation's webhook endpoint (the host queues its deliveries)
    owner: str = "default"  # the conversation's owner (its memory stores are the owner's)
    document_ids: list[str] = field(default_factory=list)  # the knowledge base this conversation searches
    memory_stores: list[str] = field(default_factory=list)  # where what the user says about themselves is kept
    memories: list[tuple[str, str]] = field(default_factory=list)  # (kind, fact) remembered from earlier calls


@dataclass(frozen=True)
class LLMSettings:
    params: GenerationParams
    max_sentences: int
    endpoint: dict | None  # a persona's own OpenAI-compatible endpoint (base_url, api_key, model), or None


def llm_settings(persona: PersonaIn, conversation: str | None = None) -> LLMSettings:
    """`conversation`: its id, so a backend with a prompt cache per conversation keeps this one's."""
    llm = persona.layers.llm
    endpoint = {"base_url": str(llm.base_url), "api_key": llm.api_key, "model": llm.model} if llm.base_url else None
    # report_prompt: each turn's timings say how much of the prompt the backend's cache held.
    return LLMSettings(GenerationParams(max_tokens=llm.max_tokens, temperature=llm.temperature, report_prompt=True,
                                        conversation=conversation),
                       llm.max_sentences, endpoint)


def patience_s(persona: PersonaIn) -> float:
    return PATIENCE_S[persona.layers.conversational_flow.turn_taking_patience]


def interrupt_after_s(persona: PersonaIn) -> float:
    return INTERRUPT_AFTER_S[persona.layers.conversational_flow.replica_interruptibility]
