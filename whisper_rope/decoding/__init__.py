"""Batched decoding: upstream's `DecodingTask`, beam search and timestamp rules, right for many rows at once.

* `task` - `BatchDecodingTask` and `ClipMaskedInference`: upstream's decoding task for batches of clips (an unpadded
  encoder's clips masked to their own frames).
* `beam_search` - `BatchBeamSearchDecoder`: upstream's beam-search choices, selected with tensor ops over all rows.
* `timestamp_rules` - `BatchTimestampRules`: upstream's timestamp rules over all rows at once.
"""
