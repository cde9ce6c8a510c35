"""Where a long recording's transcript turns on one word: each model's margin of a word over its rival, under one
model's history through upstream's loop.

    python benchmarks/word_margins.py --audio REC.flac --word " Nobody" --rival " No" --history tiny.en \
        --models tiny.en runs/sliced/model.pt

The ``--history`` model transcribes the recording as `evaluate --long-form loop` does (upstream's ``transcribe``,
temperature 0, conditioned on the previous text), and each window's prompt and decoded tokens are kept. Every place
where it wrote ``--word`` or ``--rival`` is a *site*. At each site every model of ``--models`` decodes that window
once more, with the same prompt and the window's tokens before the site as the prefix, and its first step gives
log p(word) - log p(rival) (before upstream's logit filters): positive where the model, given that history, writes
the word. A model that would have written the same text given the same history has margins of the same sign;
comparing histories (run the script once with each model as ``--history``) tells a word the models read
differently from one carried from earlier windows by the prompt. Prints a markdown table, one row per model.
"""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, NamedTuple, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from whisper.decoding import DecodingOptions  # noqa: E402
from whisper.tokenizer import get_tokenizer  # noqa: E402
from whisper.transcribe import transcribe  # noqa: E402

from whisper_rope import load_model  # noqa: E402
from whisper_rope.audio import load_audio  # noqa: E402
from whisper_rope.evaluation.evaluate import EvaluationOptions, long_form_options  # noqa: E402


class Site(NamedTuple):
    """One place where the history model wrote the word or its rival: its window, options and the tokens before it."""

    mel: torch.Tensor  # (n_mels, 3000): the window upstream's loop decoded
    options: DecodingOptions  # as the loop set them, the previous text as the prompt
    prefix: List[int]  # the window's sampled tokens before the site
    written: int  # the token the history model wrote there


def single_token(tokenizer, text: str, option: str) -> int:
    tokens = tokenizer.encode(text)
    if len(tokens) != 1:
        raise SystemExit(f"{option} {text!r}: expected text that is one token, got {len(tokens)} tokens {tokens}")
    return tokens[0]


def sites_of(model, audio: np.ndarray, candidates: Sequence[int]) -> List[Site]:
    """Transcribe ``audio`` through upstream's loop with the keywords `evaluate --long-form loop` passes (greedy,
    temperature 0, previous text as the prompt) and return every place a window's tokens hold one of ``candidates``."""
    windows = []
    decode = model.decode

    def recording_decode(mel, options):
        result = decode(mel, options)
        windows.append((mel, options, result.tokens))
        return result

    model.decode = recording_decode  # an instance attribute: the class's method is untouched
    try:
        transcribe(model, audio, **long_form_options(EvaluationOptions(), language=None, prompt=None))
    finally:
        del model.decode
    return [
        Site(mel, options, tokens[:i], token)
        for mel, options, tokens in windows
        for i, token in enumerate(tokens)
        if token in candidates
    ]


@torch.no_grad()
def margin(model, site: Site, word: int, rival: int) -> float:
    """log p(word) - log p(rival) at the site's first decoding step, the model's own distribution (no logit filter)."""
    first_step = []

    def keep_first(module, inputs, logits):
        if not first_step:
            first_step.append(logits[0, -1].float().log_softmax(dim=-1))

    hook = model.decoder.register_forward_hook(keep_first)
    try:
        model.decode(site.mel, dataclasses.replace(site.options, prefix=list(site.prefix), sample_len=1))
    finally:
        hook.remove()
    log_probs = first_step[0]
    return float(log_probs[word] - log_probs[rival])


def table(names: Sequence[str], margins: Sequence[Sequence[float]], written: Sequence[str]) -> str:
    """Markdown: one row per model, one column per site (headed by what the history model wrote there)."""
    lines = ["| model | " + " | ".join(f"{i + 1}: {text.strip()}" for i, text in enumerate(written)) + " |"]
    lines.append("|---|" + "---|" * len(written))
    for name, row in zip(names, margins):
        lines.append(f"| {name} | " + " | ".join(f"{value:+.2f}" for value in row) + " |")
    return "\n".join(lines)


def main(argv: "Sequence[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", required=True, help="the recording (any length; read through upstream's loop)")
    parser.add_argument("--word", required=True, help='the word, as one token with its leading space: " Nobody"')
    parser.add_argument("--rival", required=True, help='the token it is weighed against: " No"')
    parser.add_argument("--history", default="tiny.en", help="the model whose loop gives the prompts and prefixes")
    parser.add_argument("--models", nargs="+", required=True, help="models (names or checkpoints) to weigh it")
    args = parser.parse_args(argv)
    history = load_model(args.history, device="cpu")
    tokenizer = get_tokenizer(history.is_multilingual, num_languages=history.num_languages)
    word, rival = single_token(tokenizer, args.word, "--word"), single_token(tokenizer, args.rival, "--rival")
    sites = sites_of(history, load_audio(args.audio), (word, rival))
    if not sites:
        raise SystemExit(f"{args.audio}: {args.history} wrote neither {args.word!r} nor {args.rival!r}")
    margins = []
    for name in args.models:
        model = history if name == args.history else load_model(name, device="cpu")
        margins.append([margin(model, site, word, rival) for site in sites])
    print(f"{len(sites)} sites in the loop of {args.history}; log p({args.word!r}) - log p({args.rival!r}):\n")
    print(table(args.models, margins, [tokenizer.decode([site.written]) for site in sites]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
