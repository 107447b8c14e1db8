"""Speakers: x-vectors from reference audio and CustomVoice speaker rows."""
