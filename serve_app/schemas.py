"""Request and response bodies of the REST API (the de-facto industry shape, see DESIGN.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from models.llm import GenerationParams
from models.tools import check_parameters_schema

Level = Literal["low", "medium", "high"]
Emotion = Literal["neutral", "joy", "sadness", "anger", "surprise"]
# client: the browser draws the head (fetched once) from animation state on the data channel;
# server: the session renders and sends a video track. None: the profile's default.
VideoMode = Literal["client", "server"]


class FunctionSpec(BaseModel):
    """An OpenAI-style function: what the LLM may call, with its arguments as a JSON Schema."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
    description: str = Field("", max_length=2000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(v)) > 20000:
            raise ValueError("parameters schema over 20000 characters")
        check_parameters_schema(v)
        return v


class ToolDelivery(BaseModel):
    """Where the server POSTs the call itself (under the outbound policy), instead of asking the client."""

    model_config = ConfigDict(extra="forbid")
    url: HttpUrl
    timeout_s: float = Field(5.0, gt=0.0, le=30.0)


class LLMTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionSpec
    delivery: ToolDelivery | None = None  # None: sent to the client as conversation.tool_call

    def openai(self) -> dict:
        """The definition as the LLM is given it (no delivery details)."""
        return {"type": "function", "function": self.function.model_dump()}


class LLMLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=200)
    base_url: HttpUrl | None = None
    api_key: str | None = Field(None, max_length=500)
    max_tokens: int = Field(GenerationParams.max_tokens, ge=8, le=1024)
    temperature: float = Field(GenerationParams.temperature, ge=0.0, le=2.0)
    max_sentences: int = Field(2, ge=1, le=10)  # a spoken reply stops after this many sentences
    # strict: the persona's context is the facts replies keep to (said "I don't know" otherwise);
    # off: the context is background the LLM may go beyond.
    grounding: Literal["strict", "off"] = "strict"
    tools: list[LLMTool] = Field(default_factory=list, max_length=16)
    tool_timeout_s: float = Field(10.0, ge=1.0, le=120.0)  # how long a client's tool_result is waited for

    @model_validator(mode="after")
    def _unique_tool_names(self) -> LLMLayer:
        names = [t.function.name for t in self.tools]
        if len(names) != len(set(names)):
            raise ValueError("tool names must be unique")
        return self


class TTSLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tts_engine: Literal["piper"] = "piper"
    speed: float = Field(1.0, ge=0.5, le=2.0)


class STTLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stt_engine: Literal["whisper"] = "whisper"
    hotwords: str | None = Field(None, max_length=500)


PerceptionSignal = Literal["joy", "sadness", "anger", "frustrated", "surprise", "neutral", "looking_away", "absent",
                           "eyes_closed", "incongruent"]


class PerceptionTool(BaseModel):
    """A threshold on the perception state: when `signal` has held for `for_s` seconds (at
    `min_confidence` for emotions), the session sends `conversation.perception_tool_call`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
    description: str = Field("", max_length=1000)
    signal: PerceptionSignal
    for_s: float = Field(5.0, ge=0.0, le=3600.0)
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    llm_tool_call: bool = False  # also send it as a `conversation.tool_call` (the LLM-tool event shape)


class PerceptionLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    perception_model: Literal["basic", "off"] = "basic"
    llm_context: bool = True  # the perception state goes into the LLM's system message for each reply
    camera_fps: float = Field(4.0, ge=1.0, le=10.0)  # frames analysed per second (>= 3.4 keeps it <= 300 ms stale)
    perception_tools: list[PerceptionTool] = Field(default_factory=list, max_length=16)
    tool_call_frames: bool = True  # attach the triggering frames (small JPEGs) to perception tool calls


class ConversationalFlowLayer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    turn_taking_patience: Level = "medium"
    replica_interruptibility: Level = "medium"


class Layers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llm: LLMLayer = Field(default_factory=LLMLayer)
    tts: TTSLayer = Field(default_factory=TTSLayer)
    stt: STTLayer = Field(default_factory=STTLayer)
    perception: PerceptionLayer = Field(default_factory=PerceptionLayer)
    conversational_flow: ConversationalFlowLayer = Field(default_factory=ConversationalFlowLayer)


# What a participant (the meeting token) may send on the data channel, at most; a persona may allow less.
# `echo` (make the avatar say given words) and context changes need the operator grant.
ParticipantGrant = Literal["respond", "interrupt"]
PARTICIPANT_GRANTS = frozenset({"respond", "interrupt"})
OPERATOR_GRANTS = PARTICIPANT_GRANTS | {"echo", "context"}


DocumentId = Annotated[str, Field(min_length=1, max_length=64)]
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
StoreName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,100}$")]


class KnowledgeLayer(BaseModel):
    """How the knowledge base reaches replies: the top passages for the user's words, at the end of the prompt."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(3, ge=1, le=8)
    max_chars: int = Field(700, ge=100, le=4000)  # ~175 tokens: what a CPU LLM reads per turn
    min_score: float = Field(0.25, ge=-1.0, le=1.0)
    # Passages a reply reads itself when none were prefilled while the user spoke (an utterance too
    # short for the interim lookup): each adds its tokens to the time to first token on a CPU.
    late_passages: int = Field(1, ge=0, le=8)
    # ... and each of those is cut to its sentences that share most words with the user's (~1.4 tokens a word).
    late_words: int = Field(24, ge=8, le=200)


class PersonaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona_name: str = Field(..., min_length=1, max_length=200)
    system_prompt: str = Field("", max_length=20000)
    context: str = Field("", max_length=50000)
    default_replica_id: str | None = Field(None, max_length=64)
    emotion: Emotion = "neutral"
    video_mode: VideoMode | None = None
    layers: Layers = Field(default_factory=Layers)
    participant_grants: list[ParticipantGrant] = Field(default_factory=lambda: ["interrupt", "respond"], max_length=2)
    document_ids: list[DocumentId] = Field(default_factory=list, max_length=100)
    document_tags: list[Tag] = Field(default_factory=list, max_length=20)
    knowledge: KnowledgeLayer = Field(default_factory=KnowledgeLayer)


class PersonaPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona_name: str | None = Field(None, min_length=1, max_length=200)
    system_prompt: str | None = Field(None, max_length=20000)
    context: str | None = Field(None, max_length=50000)
    default_replica_id: str | None = Field(None, max_length=64)
    emotion: Emotion | None = None
    video_mode: VideoMode | None = None
    layers: Layers | None = None
    participant_grants: list[ParticipantGrant] | None = Field(None, max_length=2)
    document_ids: list[DocumentId] | None = Field(None, max_length=100)
    document_tags: list[Tag] | None = Field(None, max_length=20)
    knowledge: KnowledgeLayer | None = None


class ConversationProperties(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_call_duration: int = Field(1800, ge=10, le=4 * 3600)
    participant_left_timeout: int = Field(60, ge=0, le=3600)
    participant_absent_timeout: int = Field(300, ge=5, le=3600)
    language: Literal["english", "en"] = "english"


class ConversationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replica_id: str | None = Field(None, max_length=64)
    persona_id: str | None = Field(None, max_length=64)
    conversation_name: str = Field("", max_length=200)
    conversational_context: str = Field("", max_length=50000)
    custom_greeting: str | None = Field(None, max_length=2000)
    video_mode: VideoMode | None = None  # overrides the persona's
    callback_url: HttpUrl | None = None
    properties: ConversationProperties = Field(default_factory=ConversationProperties)
    document_ids: list[DocumentId] = Field(default_factory=list, max_length=100)  # with the persona's
    document_tags: list[Tag] = Field(default_factory=list, max_length=20)
    # Facts the user states about themselves are kept under these keys at the end of the call, and the
    # next conversation naming one starts knowing them.
    memory_stores: list[StoreName] = Field(default_factory=list, max_length=5)


class DocumentFields(BaseModel):
    """What POST /v2/documents takes beside the document (the multipart form's other fields)."""

    model_config = ConfigDict(extra="forbid")
    document_name: str = Field("", max_length=200)
    tags: list[Tag] = Field(default_factory=list, max_length=20)
    callback_url: HttpUrl | None = None


class DocumentURLIn(DocumentFields):
    """POST /v2/documents with a URL the server fetches (under the outbound-HTTP policy)."""

    document_url: HttpUrl


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scopes: list[Literal["read", "operator", "admin"]] = Field(..., min_length=1, max_length=3)
    name: str = Field("", max_length=200)
    expires_in_days: float | None = Field(None, gt=0, le=3650)


class OperatorTokenIn(BaseModel):
    """A join token with the operator grant (echo and context changes on the data channel)."""

    model_config = ConfigDict(extra="forbid")
    scope: Literal["operator"] = "operator"

    def grants(self) -> frozenset[str]:
        return OPERATOR_GRANTS


class OfferJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["offer"]
    sdp: str = Field(..., max_length=100_000, pattern=r"^v=0")


DEFAULT_PERSONA = PersonaIn(
    persona_name="Anna",
    system_prompt=(
        "You are Anna, a warm and curious person talking with someone on a live video call. "
        "Speak naturally, like in a real conversation. Answer in one or two short sentences. "
        "Never use lists, markdown or emojis."
    ),
)
