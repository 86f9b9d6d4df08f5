"""Perception: how the user is, from face, voice and words (issue 5; the voice part so far)."""
