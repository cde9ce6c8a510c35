"""Transcription: many short files in batches, long recordings in batched speech chunks.

* `transcribe` - `transcribe_many`: many files, one batched first decode, upstream's `transcribe` for the rest;
  recordings over 30 s through `longform`.
* `longform` - `transcribe_chunked`, `transcribe_recordings`: long recordings' speech chunks decoded in batches,
  timed segments.
* `speech_chunks` - voice-activity detection (silero-vad) and speech chunks of at most 25 s.
* `window_options` - upstream ``transcribe``'s keywords turned into one window's `DecodingOptions` and mel dtype.
* `single_window` - `decode_single_window`: a recording of up to 60 s in one window, for encoders without a table.

The functions ``whisper_rope.transcribe_many`` and ``whisper_rope.transcribe_chunked`` are these modules'; this package
does not re-export them, so that importing one module (``data`` uses `speech_chunks`) imports no other.
"""
