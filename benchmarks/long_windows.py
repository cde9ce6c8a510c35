"""What a model does with one window of k clips spoken in a row, up to beyond the 30 s no absolute table can position.

    python benchmarks/long_windows.py --corpus CORPUS --split in-domain --models source=tiny.en rotary=RUN/model.pt \
        --clips 1 2 4 8 12 16 --windows 20 --out DIR

For each k, ``--windows`` windows are made of k consecutive clips of the split (0.3 s of silence between them,
references joined), each decoded greedily *as one unpadded window* (no 30-s chunking; the decoding cap is the
references' tokens x 3 + 10, within the text context). A model whose encoder adds a table can take at most 30 s and
is reported as "–" beyond; ``source`` is also given its usual 30-s padded window up to 30 s. Writes
``DIR/long_windows.json``, ``.md`` and ``.png`` (WER against window length).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from whisper.audio import N_FRAMES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim  # noqa: E402
from whisper.decoding import DecodingOptions  # noqa: E402
from whisper.tokenizer import get_tokenizer  # noqa: E402

from whisper_rope import load_model  # noqa: E402
from whisper_rope.audio import load_audio  # noqa: E402
from whisper_rope.data import read_manifest  # noqa: E402
from whisper_rope.evaluation.evaluate import score_texts  # noqa: E402

GAP_SECONDS = 0.3


def windows_of(corpus: Path, split: str, clips: int, count: int):
    """``count`` (audio, reference) pairs, each ``clips`` consecutive clips of the split joined by short gaps."""
    examples = read_manifest(corpus / f"{split}.jsonl").examples
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    for start in range(0, min(len(examples) - clips + 1, count * clips), clips):
        group = examples[start : start + clips]
        pieces = []
        for example in group:
            pieces += [load_audio(example.audio), gap]
        yield np.concatenate(pieces[:-1]), " ".join(example.text for example in group)


@torch.no_grad()
def decode_window(model, audio: np.ndarray, reference_tokens: int, padded: bool) -> Optional[str]:
    """The greedy transcript of one window, or None when the model cannot take it (a table encoder beyond 30 s)."""
    if padded:
        if len(audio) > 30 * SAMPLE_RATE:
            return None
        mel = log_mel_spectrogram(pad_or_trim(audio), n_mels=model.dims.n_mels)
    else:
        mel = log_mel_spectrogram(audio, n_mels=model.dims.n_mels)
        mel = mel[:, : mel.shape[-1] - mel.shape[-1] % 2]
        if model.encoder.has_table and mel.shape[-1] > N_FRAMES:
            return None
    sample_len = min(model.dims.n_text_ctx - 8, 3 * reference_tokens + 10)
    options = DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=sample_len)
    with model.using(unpadded=not padded):
        return model.decode(mel, options).text


def measure(models: Dict[str, str], args: argparse.Namespace) -> List[Dict]:
    rows = []
    for name, source in models.items():
        model = load_model(source, device="cpu")
        encode = get_tokenizer(model.is_multilingual, num_languages=model.num_languages).encode
        modes = [("unpadded", False)] + ([("30-s window", True)] if name == "source" else [])
        for clips in args.clips:
            windows = list(windows_of(args.corpus, args.split, clips, args.windows))
            seconds = float(np.mean([len(audio) / SAMPLE_RATE for audio, _ in windows]))
            for mode, padded in modes:
                hypotheses = [decode_window(model, a, len(encode(" " + r)), padded) for a, r in windows]
                if any(h is None for h in hypotheses):
                    rows.append({"model": name, "mode": mode, "clips": clips, "seconds": seconds, "wer": None})
                    continue
                rates, _ = score_texts([r for _, r in windows], hypotheses)
                rows.append({"model": name, "mode": mode, "clips": clips, "seconds": seconds, "wer": rates.wer})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _table(rows: List[Dict]) -> str:
    lines = ["| model | input | clips per window | mean window s | WER % |", "|---|---|---|---|---|"]
    for r in rows:
        wer = "–" if r["wer"] is None else f"{100 * r['wer']:.1f}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['clips']} | {r['seconds']:.1f} | {wer} |")
    return "\n".join(lines)


def _plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key in sorted({(r["model"], r["mode"]) for r in rows}):
        points = [
            (r["seconds"], 100 * r["wer"]) for r in rows if (r["model"], r["mode"]) == key and r["wer"] is not None
        ]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{key[0]} ({key[1]})")
    ax.axvline(30, color="grey", linestyle=":", label="30 s: the table's end")
    ax.set_xlabel("window length (s)")
    ax.set_ylabel("WER %")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a corpus of benchmarks/build_corpus.py")
    parser.add_argument("--split", default="in-domain", help="the split whose clips are joined")
    parser.add_argument("--models", nargs="+", required=True, help="NAME=MODEL (a name or checkpoint path)")
    parser.add_argument("--clips", nargs="+", type=int, default=[1, 2, 4, 8, 12, 16], help="clips per window")
    parser.add_argument("--windows", type=int, default=20, help="windows per length")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = dict(item.split("=", 1) for item in args.models)
    rows = measure(models, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_windows.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "long_windows.md").write_text(_table(rows) + "\n")
    _plot(rows, args.out / "long_windows.png")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
