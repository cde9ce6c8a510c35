"""whisper_rope.evaluation.evaluate: scores against hand-computed edits, the CLI end to end with real tiny.en
weights, and batched decoding equal to one clip at a time."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import whisper_rope
from tests.conftest import FIXTURES, randomise_, small_dims
from whisper_rope.cli.evaluate import main
from whisper_rope.data import DataError
from whisper_rope.evaluation.evaluate import EvaluationOptions, evaluate, score_texts
from whisper_rope.training.config import FinetuneConfig
from whisper_rope.training.loop import finetune

SPEECH = FIXTURES / "speech" / "manifest.jsonl"
#: What real tiny.en (greedy, fp32, 30-s windows) makes of the committed speech fixtures: 5 substituted words of 64
#: ("our meeting starts at 3 in the afternoon" -> "our meetings are set free in the afternoon"; "cup" -> "card");
#: int8 (the command's default on the CPU) makes 5 too.
FIXTURE_ERRORS, FIXTURE_WORDS = 5, 64


# ---- scoring: hand-computed edits --------------------------------------------------------------------------------


def test_deletion_counts_words_and_characters():
    corpus, [(ref, hyp, rates)] = score_texts(["The cat sat on the mat."], ["the cat sat on mat"])
    assert (ref, hyp) == ("the cat sat on the mat", "the cat sat on mat")
    assert (rates.substitutions, rates.deletions, rates.insertions, rates.n_words) == (0, 1, 0, 6)
    assert rates.wer == pytest.approx(1 / 6)
    assert rates.cer == pytest.approx(4 / 22)  # "the " deleted from 22 characters
    assert corpus == rates


def test_empty_hypothesis_deletes_every_word():
    _, [(_, hyp, rates)] = score_texts(["Hello world."], [""])
    assert hyp == ""
    assert (rates.deletions, rates.n_words, rates.wer, rates.cer) == (2, 2, 1.0, 1.0)


def test_empty_reference_makes_every_word_an_insertion():
    _, [(ref, hyp, rates)] = score_texts([""], ["Um, good morning."])
    assert (ref, hyp) == ("", "good morning")  # the English normaliser drops the filler "um"
    assert (rates.insertions, rates.n_words, rates.wer) == (2, 0, 2.0)
    _, [(_, _, silent)] = score_texts([""], [""])
    assert (silent.wer, silent.cer) == (0.0, 0.0)


def test_corpus_rates_pool_the_edits_of_all_utterances():
    corpus, _ = score_texts(["The cat sat on the mat.", "Hello world.", ""], ["the cat sat on mat", "", "Um, hello."])
    # 1 + 2 deletions and 1 insertion over 6 + 2 + 0 reference words; characters: 4 + 11 + 5 edits over 22 + 11.
    assert (corpus.substitutions, corpus.deletions, corpus.insertions, corpus.n_words) == (0, 3, 1, 8)
    assert corpus.wer == pytest.approx(4 / 8)
    assert corpus.cer == pytest.approx(20 / 33)


@pytest.mark.parametrize(
    "normalizer, substitutions",
    [("english", 0), ("basic", 2), ("none", 4)],
)
def test_normalizers_decide_what_counts_as_an_error(normalizer, substitutions):
    # English: "Mr." -> "mister", "20 dollars" and "twenty dollars" -> "$20". Basic: case and punctuation only
    # ("mr" != "mister", "20" != "twenty"). None: "Mr.", "Smith", "20" and "dollars." all differ.
    _, [(_, _, rates)] = score_texts(["Mr. Smith paid 20 dollars."], ["mister smith paid twenty dollars"], normalizer)
    assert (rates.substitutions, rates.deletions, rates.insertions) == (substitutions, 0, 0)


@pytest.mark.parametrize("normalizer, errors", [("english", 0), ("basic", 0), ("none", 2)])
def test_case_and_punctuation(normalizer, errors):
    corpus, _ = score_texts(["Hello, World!"], ["hello world"], normalizer)
    assert corpus.substitutions == errors


def test_bad_options_are_one_sentence():
    with pytest.raises(ValueError, match="unknown normalizer 'latin'"):
        score_texts(["a"], ["a"], "latin")
    with pytest.raises(ValueError, match="one hypothesis per reference: got 2 and 1"):
        score_texts(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="--batch-size/--batch_size must be a whole number from 1 to 1024, got 0"):
        EvaluationOptions(batch_size=0).validate()
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        EvaluationOptions(language="klingon").validate()


# ---- real tiny.en --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small decoding steps run several times faster on one thread than on two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return whisper_rope.load_model("tiny.en", device="cpu")


@pytest.fixture(scope="module")
def batched(tiny):
    return evaluate(tiny, SPEECH, batch_size=8, progress=False)


def test_cli_end_to_end_on_the_speech_fixtures(tmp_path, capsys):
    output = tmp_path / "out" / "tiny.json"
    assert (
        main(["--model", "tiny.en", "--data", str(SPEECH), "--output", str(output), "--no-progress", "--device", "cpu"])
        == 0
    )
    printed = capsys.readouterr().out
    edits = r"\(\d+ substitutions, \d+ deletions, \d+ insertions; 64 reference words\)"
    assert re.search(r"WER +\d+\.\d\d % +" + edits, printed)
    assert f"wrote {output}" in printed
    assert "decoding: greedy, int8, 30-s windows" in printed  # --compute_type auto: int8 on the CPU
    summary = json.loads(output.read_text())
    assert summary["compute_type"] == "int8"
    assert summary["n_utterances"] == 8
    assert summary["n_words"] == FIXTURE_WORDS
    assert summary["wer"] == pytest.approx(FIXTURE_ERRORS / FIXTURE_WORDS, abs=1.5 / FIXTURE_WORDS)
    assert summary["normalizer"] == "english" and summary["decoding"] == "greedy" and not summary["unpadded"]
    assert summary["cap"] == "3 x reference tokens + 10" and summary["n_capped"] == 0
    assert summary["audio_seconds"] == pytest.approx(24.1, abs=0.1)
    assert summary["rtf"] == pytest.approx(summary["decode_seconds"] / summary["audio_seconds"], rel=1e-3)
    rows = [json.loads(line) for line in output.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 8
    manifest = [json.loads(line) for line in SPEECH.read_text().splitlines()]
    assert [row["reference"] for row in rows] == [m["text"] for m in manifest]
    assert [Path(row["audio"]).name for row in rows] == [m["audio"] for m in manifest]
    assert sum(r["substitutions"] + r["deletions"] + r["insertions"] for r in rows) == round(summary["wer"] * 64)
    assert all(r["n_tokens"] < r["cap"] for r in rows)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "rotary/nonsense"], "rotary/nonsense"),
        (
            ["--normalizer", "english", "--batch-size", "0"],
            "--batch-size/--batch_size must be a whole number from 1 to 1024, got 0",
        ),
    ],
)
def test_cli_errors_are_one_line(extra, message, capsys):
    assert main(["--model", "tiny.en", "--data", str(SPEECH), "--no-progress", "--device", "cpu", *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("whisper-rope: error: ") and message in error and "\n" not in error


def test_bad_manifest_rows_stop_the_evaluation_unless_skipped(tiny, tmp_path):
    clip = FIXTURES / "speech" / "flite_awb.flac"
    truncated = tmp_path / "truncated.flac"  # a valid header (2.2 s) and no decodable audio
    truncated.write_bytes(clip.read_bytes()[:200])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(row) + "\n"
            for row in [
                {"audio": str(clip), "text": "We need more water for the garden."},
                {"audio": "missing.flac", "text": "nothing"},
                {"audio": truncated.name, "text": "nothing either"},
            ]
        )
    )
    with pytest.raises(DataError, match="row 2"):
        evaluate(tiny, manifest, progress=False)
    result = evaluate(tiny, manifest, skip_invalid=True, progress=False)
    assert result.n_utterances == 1 and result.wer == 0.0 and len(result.rows) == 1
    assert result.audio_seconds == pytest.approx(result.rows[0].seconds)
    assert [line[:5] for line in result.skipped] == ["row 2", "row 3"]
    assert "could not be decoded" in result.skipped[1]


def test_batched_padded_decoding_equals_one_clip_at_a_time(tiny, batched):
    alone = evaluate(tiny, SPEECH, batch_size=1, progress=False)
    assert [r.hypothesis for r in batched.rows] == [r.hypothesis for r in alone.rows]
    assert [r.n_tokens for r in batched.rows] == [r.n_tokens for r in alone.rows]
    assert abs(batched.substitutions + batched.deletions + batched.insertions - FIXTURE_ERRORS) <= 1


def test_batched_unpadded_decoding_with_caps_equals_one_clip_at_a_time():
    """A rotary encoder fed each clip's own frames: clips of different lengths share a batch, padding is masked,
    and a hypothesis cut to its cap equals decoding alone with that cap (zero-shot, so most hypotheses loop)."""
    model = whisper_rope.load_model("tiny.en", variant="rotary/learned", device="cpu", unpadded=True)
    options = EvaluationOptions(batch_size=8, cap_factor=1.0, cap_offset=4)
    batched = evaluate(model, SPEECH, options, progress=False)
    alone = evaluate(model, SPEECH, options, batch_size=1, progress=False)
    assert batched.unpadded and batched.n_capped >= 4  # the cap matters in this comparison
    assert len({r.cap for r in batched.rows}) > 1
    assert [r.hypothesis for r in batched.rows] == [r.hypothesis for r in alone.rows]
    assert all(r.n_tokens <= r.cap for r in batched.rows)
    assert model.unpadded  # restored


def test_batched_beam_search_equals_one_clip_at_a_time():
    model = whisper_rope.load_model("tiny.en", variant="rotary/learned", device="cpu", unpadded=True)
    names = ("flite_slt", "espeak_en", "flite_kal")
    data = [(FIXTURES / "speech" / f"{name}.flac", "one two three four") for name in names]
    options = EvaluationOptions(beam_size=2, cap_factor=1.0, cap_offset=2)
    batched = evaluate(model, data, options, batch_size=3, progress=False)
    alone = evaluate(model, data, options, batch_size=1, progress=False)
    assert batched.decoding == "beam search (2 beams)"
    assert [r.hypothesis for r in batched.rows] == [r.hypothesis for r in alone.rows]


# ---- one evaluator: training's validation and `evaluate` ------------------------------------------------------------


@pytest.mark.parametrize("variant", ["whisper", "rotary"], ids=["30-s windows", "unpadded"])
def test_training_and_evaluate_report_the_same_wer_for_the_same_model_data_and_options(tmp_path, variant):
    """The WER in train_log.jsonl (and so in docs/results.md) is the WER `whisper-rope evaluate` reports."""
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    whisper_rope.save_checkpoint(randomise_(whisper_rope.build_model(small_dims(n_audio_ctx=1500), variant)), source)
    config = FinetuneConfig(
        model=str(source),
        train=str(SPEECH),
        eval=str(SPEECH),
        output=str(tmp_path / "run"),
        steps=1,
        batch_size=4,
        lr=1e-6,
        warmup_steps=0,
        num_workers=0,
        progress=False,
        device="cpu",
        threads=1,
        save_dtype="float32",  # the model validation scored, as it is
    )
    finetune(config=config)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    validation = [record for record in log if record["event"] == "eval"][-1]

    model = whisper_rope.load_model(tmp_path / "run" / "model.pt", device="cpu")
    result = evaluate(model, SPEECH, batch_size=4, fp16=False, unpadded=variant == "rotary", progress=False)

    assert result.n_utterances == validation["n_clips"] == 8
    assert result.n_words == validation["n_words"] == FIXTURE_WORDS
    for key in ("wer", "cer", "substitutions", "deletions", "insertions"):
        assert result.to_dict()[key] == validation[key], key
    assert result.n_capped == validation["capped"]
    assert validation["wer"] > 0 and math.isfinite(validation["loss"])
