"""`BatchTimestampRules` masks logits exactly as upstream's `ApplyTimestampRules`, row for row."""

import pytest
import torch
from whisper.decoding import ApplyTimestampRules
from whisper.tokenizer import get_tokenizer

from whisper_rope.decoding.timestamp_rules import BatchTimestampRules

TOKENIZER = get_tokenizer(False)
N_VOCAB = 51864
SAMPLE_BEGIN = 3


def random_rows(generator: torch.Generator, n_rows: int, n_sampled: int) -> torch.Tensor:
    """(n_rows, SAMPLE_BEGIN + n_sampled) tokens: a prompt, then text and timestamp tokens mixed, including the
    endings the rules distinguish (text, a lone timestamp, a pair of timestamps)."""
    begin = TOKENIZER.timestamp_begin
    text = torch.randint(0, TOKENIZER.eot, (n_rows, n_sampled), generator=generator)
    stamps = begin + torch.randint(0, 1501, (n_rows, n_sampled), generator=generator).sort(dim=-1).values
    choose = torch.rand(n_rows, n_sampled, generator=generator) < 0.4
    sampled = torch.where(choose, stamps, text)
    prompt = torch.tensor(TOKENIZER.sot_sequence)[None].expand(n_rows, -1)
    return torch.cat([prompt, sampled], dim=-1)


@pytest.mark.parametrize("n_sampled, max_initial", [(0, None), (0, 50), (1, None), (2, None), (30, None)])
def test_batch_rules_mask_every_row_as_upstream(n_sampled, max_initial):
    generator = torch.Generator().manual_seed(n_sampled)
    ours = BatchTimestampRules(TOKENIZER, SAMPLE_BEGIN, max_initial)
    theirs = ApplyTimestampRules(TOKENIZER, SAMPLE_BEGIN, max_initial)
    masked_rows = 0
    for trial in range(4):
        tokens = random_rows(generator, 24, n_sampled)
        logits = torch.randn(24, N_VOCAB, generator=generator) * 3
        if trial % 2:  # timestamps likely: the "timestamps win" rule fires on some rows and not on others
            logits[:, TOKENIZER.timestamp_begin :] += torch.rand(24, 1, generator=generator) * 8
        our_logits, their_logits = logits.clone(), logits.clone()
        ours.apply(our_logits, tokens)
        theirs.apply(their_logits, tokens)
        assert torch.equal(our_logits, their_logits)
        masked_rows += int(torch.isinf(our_logits[:, : TOKENIZER.eot]).all(dim=-1).sum())
    assert masked_rows > 0  # some rows were restricted to timestamps
