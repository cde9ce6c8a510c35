"""How models go on after a wrong first word: each window's first word is forced to the first model's second choice,
then every model decodes the rest greedily.

    python benchmarks/wrong_word_recovery.py --data SET.jsonl [SET.jsonl ...] \
        --models source=tiny.en adapted=RUN/model.pt [--out REPORT.md] [--rows ROWS.jsonl]

A student distilled on its teacher's greedy transcripts only ever reads prefixes the teacher would have written.
Where the first word is a near-tie, the student may take the other one, and what it writes next is what the
training never showed it. This script puts every model on such a prefix. The first model (the source, on its 30-s
window) gives each window's best first text token that is another word than its own (not a change of case). Each
model decodes once freely and once with that token as the prefix: greedy, without timestamps, on each model's own
input (an unpadded checkpoint reads its frames and applies its end-of-text penalty, as ``whisper-rope evaluate``
decodes). The hypotheses are scored against the reference after the English normaliser. A hypothesis *repeats*
when it reached the decoding cap (``3 x reference tokens + 10``, as ``evaluate``) or its gzip compression ratio
passes 2.4 (upstream's test for a looping text). A model that recovers as the source does has about the source's
forced errors: the wrong word and what the source also changes after it.

Manifests are any transcribed manifest ``whisper-rope evaluate`` reads (e.g. the length-bucket sets of
``benchmarks/length_buckets.py``); a bad row stops the run with a ``DataError`` naming it. Prints a markdown table, one
row per model.
"""

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from whisper.audio import log_mel_spectrogram, pad_or_trim  # noqa: E402
from whisper.decoding import DecodingOptions  # noqa: E402
from whisper.tokenizer import get_tokenizer  # noqa: E402
from whisper.utils import compression_ratio  # noqa: E402

from whisper_rope import load_model  # noqa: E402
from whisper_rope.audio import load_audio  # noqa: E402
from whisper_rope.data import read_manifest  # noqa: E402
from whisper_rope.evaluation.evaluate import EvaluationOptions  # noqa: E402
from whisper_rope.evaluation.metrics import error_rates, normalizer_for  # noqa: E402

#: upstream's ``compression_ratio_threshold``: a text that gzip shrinks more than this repeats itself.
REPEATING_RATIO = 2.4
#: How far down its first step's ranking a model is searched for another word (a handful always is one).
CANDIDATES = 50


class Window(NamedTuple):
    """One utterance of a manifest: its 30-s log-mel window, reference, and the forced first token."""

    name: str
    mel: torch.Tensor  # (n_mels, 3000)
    text: str
    cap: int  # decoding cap in sampled tokens, evaluate's default: 3 x reference tokens + 10, at most 224
    forced: int  # the first model's best first text token that is another word than its own


def read_windows(manifests: Sequence[Path], source, tokenizer) -> List[Window]:
    """Every utterance of ``manifests`` (as `read_manifest` reads them, strictly) with its forced token, from
    ``source``'s first step on its 30-s window."""
    windows = []
    defaults = EvaluationOptions()  # evaluate's cap: cap_factor x reference tokens + cap_offset
    for manifest in manifests:
        for example in read_manifest(manifest, strict=True).examples:
            mel = log_mel_spectrogram(
                pad_or_trim(torch.from_numpy(load_audio(example.audio, start=example.start, end=example.end))),
                source.dims.n_mels,
            )
            reference = len(tokenizer.encode(" " + example.text.strip()))
            tokens = math.ceil(defaults.cap_factor * reference) + defaults.cap_offset
            limit = min(tokens, source.dims.n_text_ctx // 2)
            windows.append(Window(example.audio, mel, example.text, limit, second_choice(source, tokenizer, mel)))
    return windows


@torch.no_grad()
def second_choice(model, tokenizer, mel: torch.Tensor) -> int:
    """The model's best first text token that is another word than its own first one (after the English
    normaliser: " The" for " the" is no wrong word), after SOT and no-timestamps; mel (n_mels, 3000)."""
    sot = torch.tensor([list(tokenizer.sot_sequence_including_notimestamps)])
    scores = model.logits(sot, model.embed_audio(mel[None]))[0, -1].float()
    scores[tokenizer.eot :] = float("-inf")  # a word: no end of text, no timestamp
    normalise = normalizer_for("en")
    ranked = scores.topk(CANDIDATES).indices.tolist()
    first = normalise(tokenizer.decode(ranked[:1]))
    return next(t for t in ranked[1:] if normalise(tokenizer.decode([t])) not in ("", first))


def decode(model, window: Window, tokenizer, forced: bool) -> Dict[str, object]:
    """One greedy hypothesis of ``window`` (with its forced first token when ``forced``), scored."""
    prefix = [window.forced] if forced else []
    options = DecodingOptions(
        language="en", without_timestamps=True, fp16=False, sample_len=window.cap, prefix=prefix or None
    )
    result = model.decode(window.mel, options)
    text = tokenizer.decode(prefix + list(result.tokens))
    rates = error_rates([window.text], [text], normalizer_for("en"))
    repeats = len(result.tokens) >= window.cap or compression_ratio(text) > REPEATING_RATIO
    errors = rates.substitutions + rates.deletions + rates.insertions
    return {"errors": errors, "words": rates.n_words, "repeats": bool(repeats), "text": text}


def measure(
    models: Dict[str, object], windows: List[Window], tokenizer, progress: bool = True, sink: Optional[TextIO] = None
) -> List[dict]:
    """One row per model, window and way (free, forced); each also written to ``sink`` (JSON lines) as it comes."""
    rows = []
    for label, model in models.items():
        for window in tqdm(windows, desc=label, disable=not progress):
            for forced in (False, True):
                scored = decode(model, window, tokenizer, forced)
                rows.append({"model": label, "window": window.name, "forced": forced, **scored})
                if sink is not None:
                    sink.write(json.dumps(rows[-1]) + "\n")
                    sink.flush()
    return rows


def table(rows: List[dict]) -> str:
    """Markdown: per model, errors and repeating hypotheses, free and with the wrong first word."""
    lines = [
        "| model | windows | errors, free (WER %) | repeating, free | errors, wrong first word (WER %) "
        "| repeating, wrong first word |",
        "|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(row["model"] for row in rows):
        cells = []
        for forced in (False, True):
            mine = [r for r in rows if r["model"] == label and r["forced"] == forced]
            errors, words = sum(r["errors"] for r in mine), sum(r["words"] for r in mine)
            cells += [f"{errors} ({100 * errors / max(words, 1):.1f})", str(sum(r["repeats"] for r in mine))]
        windows = sum(r["model"] == label and not r["forced"] for r in rows)
        lines.append(f"| {label} | {windows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: "Sequence[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, nargs="+", required=True, help="transcribed manifests (JSONL, CSV, TSV or folders)"
    )
    parser.add_argument(
        "--models", nargs="+", required=True, help="LABEL=MODEL (a name or checkpoint); the first gives the forced word"
    )
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--rows", type=Path, help="write every hypothesis here as it comes (JSON lines)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [spec.split("=", 1) for spec in args.models]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        parser.error(f"--models takes LABEL=MODEL pairs, got {' '.join(args.models)}")
    models = {label: load_model(spec, device="cpu").eval() for label, spec in pairs}
    source = next(iter(models.values()))
    tokenizer = get_tokenizer(source.is_multilingual, num_languages=source.num_languages)
    windows = read_windows(args.data, source, tokenizer)
    with open(args.rows, "w") if args.rows else nullcontext() as sink:
        report = table(measure(models, windows, tokenizer, args.progress, sink))
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
