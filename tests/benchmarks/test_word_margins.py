"""benchmarks/word_margins.py: the sites of upstream's loop and each model's margin of a word over its rival there."""

import numpy as np
import pytest
import torch
from whisper.tokenizer import get_tokenizer

import whisper_rope
from benchmarks import word_margins
from tests.conftest import SPEECH_CLIPS, randomise_, small_dims

TOKENIZER = get_tokenizer(False)
RIVALS = [TOKENIZER.encode(text)[0] for text in (" the", " and", " of")]


@pytest.fixture(scope="module")
def recording():
    """About 33 s of the fixture clips in a row: two windows of upstream's loop, the second prompted by the first."""
    clips = [whisper_rope.audio.load_audio(path) for path in SPEECH_CLIPS]
    return np.concatenate((clips * 4)[:12])


def _model(seed):
    torch.manual_seed(seed)
    return randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), "whisper")).eval()


def test_every_site_holds_the_written_token_and_the_loops_prompt(recording):
    model = _model(0)
    sites = word_margins.sites_of(model, recording, range(TOKENIZER.eot))  # every text token written
    assert len(sites) > 10
    assert "decode" not in vars(model)  # the recording wrapper is gone
    assert all(site.written < TOKENIZER.eot for site in sites)
    assert any(site.options.prompt for site in sites)  # a later window decodes after the earlier one's text
    windows = {id(site.mel) for site in sites}
    assert len(windows) >= 2 and all(site.mel.shape == (80, 3000) for site in sites)


@torch.no_grad()
def _teacher_forced(model, site, word, rival):
    """The margin from one forward pass over the context upstream's decoding builds (its prompt and prefix rules)."""
    half = model.dims.n_text_ctx // 2
    tokens = list(TOKENIZER.sot_sequence) + list(site.prefix)[-(half - 1) :]
    if site.options.prompt:
        tokens = [TOKENIZER.sot_prev] + list(site.options.prompt)[-(half - 1) :] + tokens
    log_probs = model.logits(torch.tensor([tokens]), model.embed_audio(site.mel[None]))[0, -1].log_softmax(-1)
    return float(log_probs[word] - log_probs[rival])


def test_the_margin_is_the_models_own_at_the_sites_context(recording):
    model = _model(2)
    sites = word_margins.sites_of(model, recording, range(TOKENIZER.eot))
    prompted = [site for site in sites if site.options.prompt][:3]
    assert prompted and len({len(site.prefix) for site in sites}) > 3
    for site in sites[:3] + prompted:
        for rival in RIVALS + [sites[-1].written]:
            expected = _teacher_forced(model, site, site.written, rival)
            assert word_margins.margin(model, site, site.written, rival) == pytest.approx(expected, abs=1e-4)


def test_the_history_model_has_a_non_negative_margin_for_what_it_wrote(recording):
    """Greedy decoding wrote each site's token, so no ordinary word can be likelier there (ties count as equal)."""
    model = _model(0)
    sites = word_margins.sites_of(model, recording, range(TOKENIZER.eot))[:8]
    margins = [word_margins.margin(model, site, site.written, rival) for site in sites for rival in RIVALS]
    assert all(value >= -1e-5 for value in margins)
    assert any(value > 0.01 for value in margins)
    other = _model(1)  # another model under the same history weighs the words otherwise
    other_margins = [word_margins.margin(other, site, site.written, rival) for site in sites for rival in RIVALS]
    assert max(abs(a - b) for a, b in zip(margins, other_margins)) > 0.01


def test_the_table_heads_each_site_with_the_written_word():
    lines = word_margins.table(["tiny.en", "adapted"], [[-2.8, 0.12], [-2.95, -0.02]], [" No", " Nobody"])
    assert lines.splitlines() == [
        "| model | 1: No | 2: Nobody |",
        "|---|---|---|",
        "| tiny.en | -2.80 | +0.12 |",
        "| adapted | -2.95 | -0.02 |",
    ]


def test_a_word_of_several_tokens_is_refused_by_name(tmp_path):
    source = whisper_rope.save_checkpoint(_model(0), tmp_path / "m.pt")
    with pytest.raises(SystemExit, match="--word ' Nobodyish': expected text that is one token"):
        word_margins.main(
            [
                "--audio",
                str(SPEECH_CLIPS[0]),
                "--word",
                " Nobodyish",
                "--rival",
                " No",
                "--history",
                str(source),
                "--models",
                str(source),
            ]
        )
