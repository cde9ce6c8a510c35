"""The release of whisper_rope (setup.cfg reads it; checkpoints record it)."""

__version__ = "0.1.0"
