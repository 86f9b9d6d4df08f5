"""Sentiment of what the user said: VADER (`vaderSentiment`, MIT), a rule-based lexicon that ships
its word list inside the package. ~0.1 ms per utterance, no model download."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass
class Sentiment:
    compound: float  # -1 (very negative) .. +1 (very positive)
    positive: float
    negative: float

    @property
    def label(self) -> str:
        # VADER's own recommended cut-offs.
        return "positive" if self.compound >= 0.05 else "negative" if self.compound <= -0.05 else "neutral"


@cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> Sentiment:
    """Polarity of one utterance."""
    s = _analyzer().polarity_scores(text or "")
    return Sentiment(compound=float(s["compound"]), positive=float(s["pos"]), negative=float(s["neg"]))
