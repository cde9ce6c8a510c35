"""Batched decoding: upstream's `DecodingTask` made right for several clips at once.

Upstream repeats the token rows once per beam (or best-of-n sample) but not the audio features, which only works
for a single clip; `BatchDecodingTask` encodes and cross-attends each clip once for all its rows. For an unpadded
encoder, clips of different lengths are each encoded from their own frames and the padding is masked out of
cross-attention (`ClipMaskedInference`). `WhisperRope.decode` runs it.
"""

from dataclasses import replace
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from whisper.audio import FRAMES_PER_SECOND, TOKENS_PER_SECOND
from whisper.decoding import ApplyTimestampRules, BeamSearchDecoder, DecodingOptions, DecodingTask, PyTorchInference
from whisper.decoding import detect_language as upstream_detect_language
from whisper.model import Whisper

from ..features import audio_position_mask, cut_trailing_padding, holds_audio_end, real_frame_counts
from .beam_search import BatchBeamSearchDecoder
from .end_of_text import EndOfTextPenalty
from .timestamp_rules import BatchTimestampRules


class ClipMaskedInference(PyTorchInference):
    """Upstream's kv-cached decoder calls, passing a mask over audio positions when clips differ in length.

    xa_mask: (b, n_audio) bool, True for a clip's real positions, one row per clip (not per beam), or None.
    """

    def __init__(self, model: Whisper, initial_token_length: int, read_positions: Sequence[int] = ()):
        super().__init__(model, initial_token_length)
        self.xa_mask: Optional[Tensor] = None
        # The positions of the first step's logits that the decoding loop reads (`prompt_logits`).
        self.read_positions = sorted({p % initial_token_length for p in read_positions})

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        if self.xa_mask is None and not self._reads_few_positions(tokens):
            return super().logits(tokens, audio_features)
        if not self.kv_cache:
            self.kv_cache, self.hooks = self.model.install_kv_cache_hooks()
        if tokens.shape[-1] > self.initial_token_length:
            tokens = tokens[:, -1:]  # as upstream: only the new token once the cache holds the prompt
        elif self._reads_few_positions(tokens):
            return self.prompt_logits(tokens, audio_features)
        return self.model.decoder(tokens, audio_features, kv_cache=self.kv_cache, xa_mask=self.xa_mask)

    def _reads_few_positions(self, tokens: Tensor) -> bool:
        """Whether this is an int8 model's first step over a prompt longer than the positions read of it."""
        n_tokens = tokens.shape[-1]
        first = n_tokens == self.initial_token_length and 0 < len(self.read_positions) < n_tokens
        return first and getattr(self.model, "compute_type", None) == "int8"

    def prompt_logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """The first step's logits (rows, n_tokens, n_vocab) with only `read_positions` computed (the self-attention
        caches still get every position); the other positions are left unset.

        Upstream's loop reads two positions of this step (the start-of-transcript token's, for the no-speech
        probability, and the last); computing all of them for a 224-token prompt at beam 5 makes 230 MB of logits.
        Only an int8 model takes this way: its output projection computes each row on its own (per-row scales,
        int32 sums), so these rows are those a full product gives, bit for bit; fp32's would differ in the last bits.
        """
        decoder = self.model.decoder
        hidden = decoder.hidden(tokens, audio_features, kv_cache=self.kv_cache, xa_mask=self.xa_mask)
        out = hidden.new_empty(*hidden.shape[:2], self.model.dims.n_vocab)  # left untouched: not made resident
        out[:, self.read_positions] = decoder.logits(hidden[:, self.read_positions])
        return out

    def rearrange_kv_cache(self, source_indices: List[int]) -> None:
        """Upstream's reordering of the self-attention caches after a beam-search step, copying only the rows whose
        beam changed (upstream copies every row of every cache, each step)."""
        moved = [row for row, source in enumerate(source_indices) if row != source]
        if not moved:
            return
        rows = torch.tensor(moved)
        sources = torch.tensor([source_indices[row] for row in moved])
        for module in self.kv_modules:
            cache = self.kv_cache[module]
            cache[rows.to(cache.device)] = cache[sources.to(cache.device)]


def _batch_timestamp_rules(rules: ApplyTimestampRules) -> BatchTimestampRules:
    return BatchTimestampRules(rules.tokenizer, rules.sample_begin, rules.max_initial_timestamp_index)


class BatchDecodingTask(DecodingTask):
    """Upstream's `DecodingTask` (same options, same results) for batches of clips.

    * Several decoding rows per clip (beam search, best-of-n): upstream's ``run`` needs one feature row per
      decoding row, so the features are repeated for it, but the decoding loop gets one row per clip and
      `CrossAttention` folds a clip's rows into its query length: cross-attention keys and values are
      computed once per clip, not once per beam.
    * An unpadded encoder (``model.unpadded``): clips of different lengths are cut to the longest, each encoded as
      if alone, and cross-attention masks the rest (`ClipMaskedInference`); languages are detected per clip.
    * The per-step bookkeeping that upstream does row by row in Python runs as tensor operations over all rows,
      with upstream's results: beam search (`BatchBeamSearchDecoder`), the timestamp rules (`BatchTimestampRules`)
      and the beams' self-attention cache reordering (`ClipMaskedInference.rearrange_kv_cache`).
    * A model with an end-of-text penalty (``model.eot_penalty``) has it taken off the end-of-text logit at every
      step (`EndOfTextPenalty`): of every clip without timestamps, of the clips that hold the end of their audio
      with timestamps (`holds_audio_end`) until their last timestamp reaches their audio's end. A full 30-s window
      that upstream's loop cuts out of a longer recording decodes with timestamps as upstream: the loop reads again
      whatever follows the window's last timestamp.
    """

    def __init__(self, model: Whisper, options: DecodingOptions):
        super().__init__(model, options)
        self.inference = ClipMaskedInference(model, len(self.initial_tokens), (self.sot_index, -1))
        if isinstance(self.decoder, BeamSearchDecoder):
            self.decoder = BatchBeamSearchDecoder(
                options.beam_size, self.tokenizer.eot, self.inference, options.patience
            )
        self.logit_filters = [
            _batch_timestamp_rules(rules) if type(rules) is ApplyTimestampRules else rules
            for rules in self.logit_filters
        ]
        penalty = getattr(model, "eot_penalty", 0.0)
        timestamp_begin = None if options.without_timestamps else self.tokenizer.timestamp_begin
        self.end_of_text_penalty = (
            EndOfTextPenalty(self.tokenizer.eot, penalty, self.sample_begin, timestamp_begin) if penalty else None
        )
        if self.end_of_text_penalty is not None:  # first: the timestamp rules weigh end of text against timestamps
            self.logit_filters.insert(0, self.end_of_text_penalty)
        self.rows_per_clip = 1
        self.audio_lengths: Optional[List[int]] = None

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        dims = self.model.dims
        n_frames = None
        features_given = mel.shape[-2:] == (dims.n_audio_ctx, dims.n_audio_state)
        if self.end_of_text_penalty is not None and not (self.options.without_timestamps or features_given):
            self.end_of_text_penalty.rows = holds_audio_end(mel).repeat_interleave(self.n_group)
            audio_end = real_frame_counts(mel) // (FRAMES_PER_SECOND // TOKENS_PER_SECOND)  # in timestamp steps
            self.end_of_text_penalty.audio_end = audio_end.repeat_interleave(self.n_group)
        if self.model.unpadded and mel.shape[0] > 1 and not features_given:
            mel, n_frames = cut_trailing_padding(mel, self.model.unpadded_margin)
        if n_frames is None:
            features = super()._get_audio_features(mel)
        else:
            features = self.model.encoder(mel.half() if self.options.fp16 else mel, n_frames)
            self.inference.xa_mask = audio_position_mask(n_frames, features.shape[1], features.device)
            self.audio_lengths = self.inference.xa_mask.sum(dim=-1).tolist()
        if self.n_group > 1 and features.shape[0] > 1 and self.options.task != "lang_id":
            self.rows_per_clip = self.n_group
            features = features.repeat_interleave(self.n_group, dim=0)
        return features

    def _main_loop(self, audio_features: Tensor, tokens: Tensor):
        return super()._main_loop(audio_features[:: self.rows_per_clip], tokens)

    def _detect_language(self, audio_features: Tensor, tokens: Tensor):
        audio_features = audio_features[:: self.rows_per_clip]
        detects = self.options.language is None or self.options.task == "lang_id"
        if not detects or (self.audio_lengths is None and audio_features.shape[1] == self.model.dims.n_audio_ctx):
            return super()._detect_language(audio_features, tokens)
        # Upstream's detect_language takes features only if they are n_audio_ctx long (else it runs the encoder on
        # them): give it each clip's own frames and a view of the model whose dims say how many there are.
        lengths = self.audio_lengths or [audio_features.shape[1]] * audio_features.shape[0]
        languages, language_probs = [], []
        for i, length in enumerate(lengths):
            view = SimpleNamespace(dims=replace(self.model.dims, n_audio_ctx=length), logits=self.model.logits)
            token, probs = upstream_detect_language(view, audio_features[i : i + 1, :length], self.tokenizer)
            languages.append(max(probs[0], key=probs[0].get))
            language_probs.append(probs[0])
            if self.options.language is None:
                tokens[i, self.sot_index + 1] = token[0]
        return languages, language_probs
