"""Every claim a file makes is bounded before it costs anything.

A lying file is refused with one line naming the file and the claim, and the peak memory of refusing it stays
within a small constant of the file's size plus the model its honest tensors describe. Each case runs in a child
process (its address space capped 3 GiB above its size after the imports, so that a claim that would cost more
fails there and then) and reports its own peak resident set with ``resource.getrusage``; the growth over the peak
after the imports is compared with what loading the honest file of the same dims costs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from .commands import TOY_DIMS, checkpoint, command, mib, one_error_line, peak_memory, save_model

#: Slack over the honest model's cost: the refused file read once or twice, and Python's own bookkeeping.
SLACK = 32 << 20


def allowance(file: Path, honest_growth: int) -> int:
    return 4 * file.stat().st_size + honest_growth + SLACK


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict:
    """The toy checkpoint, its dict, and the peak-RSS growth of loading it in a fresh child."""
    path = save_model(tmp_path_factory.mktemp("honest") / "honest.pt")
    outcome = peak_memory(f"whisper_rope.load_model({str(path)!r}, device='cpu')")
    assert outcome["result"] == "ok", outcome
    print(f"robustness: loading the honest toy checkpoint ({path.stat().st_size} bytes) grows RSS by "
          f"{mib(outcome['growth'])}")  # fmt: skip
    return {"path": path, "checkpoint": checkpoint(path), "growth": outcome["growth"]}


def _lying_file(tmp_path: Path, honest: dict, name: str, dims=None, **tensors) -> Path:
    ckpt = dict(honest["checkpoint"])
    ckpt["dims"] = {**ckpt["dims"], **(dims or {})}
    ckpt["model_state_dict"] = {**ckpt["model_state_dict"], **tensors}
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    return path


def _refused_cheaply(path: Path, honest: dict, *fragments: str, load: str = "") -> dict:
    outcome = peak_memory(load or f"whisper_rope.load_model({str(path)!r}, device='cpu')")
    print(f"robustness: {path.name} ({path.stat().st_size} bytes): {outcome['result']}, RSS growth "
          f"{mib(outcome['growth'])} (honest load {mib(honest['growth'])})")  # fmt: skip
    assert outcome["result"] == "refused", outcome
    message = outcome["message"]
    assert "\n" not in message.strip() and path.name in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert outcome["growth"] <= allowance(path, honest["growth"]), (mib(outcome["growth"]), outcome)
    return outcome


def test_a_layer_count_of_ten_to_the_eighteen_is_refused_cheaply(tmp_path, honest):
    path = _lying_file(tmp_path, honest, "layers", dims={"n_audio_layer": 10**18})
    _refused_cheaply(path, honest, "n_audio_layer")


def test_a_stride_zero_tensor_is_refused_before_the_model_it_claims_is_built(tmp_path, honest):
    expanded = torch.zeros(1, TOY_DIMS["n_text_state"]).expand(10**7, -1)
    path = _lying_file(tmp_path, honest, "expanded", dims={"n_vocab": 10**7},
                       **{"decoder.token_embedding.weight": expanded})  # fmt: skip
    assert path.stat().st_size < 200_000
    _refused_cheaply(path, honest, "decoder.token_embedding.weight")


def test_a_tensor_with_overlapping_strides_is_refused(tmp_path, honest):
    width = TOY_DIMS["n_text_state"]
    storage = torch.randn(width + 4096)
    overlapping = storage.as_strided((4096, width), (1, 1))  # 4096 rows sharing all but one element each
    path = _lying_file(tmp_path, honest, "overlapping", dims={"n_vocab": 4096},
                       **{"decoder.token_embedding.weight": overlapping})  # fmt: skip
    _refused_cheaply(path, honest, "decoder.token_embedding.weight")


def test_a_context_length_no_tensor_backs_is_capped(tmp_path, honest):
    path = save_model(tmp_path / "rotary.pt", variant="rotary")
    ckpt = checkpoint(path)
    ckpt["dims"]["n_audio_ctx"] = 10**8
    torch.save(ckpt, path)
    _refused_cheaply(path, honest, "n_audio_ctx")


def test_a_text_context_no_tensor_backs_is_capped(tmp_path, honest):
    path = save_model(tmp_path / "rotary-text.pt", variant="sinusoidal/rotary")
    ckpt = checkpoint(path)
    ckpt["dims"]["n_text_ctx"] = 10**6
    torch.save(ckpt, path)
    _refused_cheaply(path, honest, "n_text_ctx")


def test_a_head_count_that_does_not_divide_the_width_is_refused(tmp_path, honest):
    path = _lying_file(tmp_path, honest, "heads", dims={"n_text_head": 2**31})
    _refused_cheaply(path, honest, "n_text_head")


def test_layers_that_all_view_one_storage_cannot_claim_a_deep_model(tmp_path, honest):
    """torch.save stores a storage once however many tensors view it: 400 decoder layers made of layer 0's tensors
    are a file of a few hundred KB describing a model 200 times the honest one."""
    state = dict(honest["checkpoint"]["model_state_dict"])
    layer = {k[len("decoder.blocks.0.") :]: v for k, v in state.items() if k.startswith("decoder.blocks.0.")}
    state = {k: v for k, v in state.items() if not k.startswith("decoder.blocks.")}
    state.update({f"decoder.blocks.{i}.{name}": tensor for i in range(400) for name, tensor in layer.items()})
    ckpt = {**honest["checkpoint"], "dims": {**honest["checkpoint"]["dims"], "n_text_layer": 400}}
    del ckpt["alignment_heads"]  # sized for 2 layers; without them the file would load as a 400-layer model
    path = tmp_path / "shared.pt"
    torch.save({**ckpt, "model_state_dict": state}, path)
    _refused_cheaply(path, honest, "share elements")


def test_a_missing_embedding_cannot_claim_a_vocabulary(tmp_path, honest):
    """Without the tensor that backs n_vocab, the claim would size the model alone (a billion-row embedding)."""
    state = dict(honest["checkpoint"]["model_state_dict"])
    del state["decoder.token_embedding.weight"]
    path = tmp_path / "no-embedding.pt"
    torch.save({**honest["checkpoint"], "dims": {**honest["checkpoint"]["dims"], "n_vocab": 10**9},
                "model_state_dict": state}, path)  # fmt: skip
    _refused_cheaply(path, honest, "decoder.token_embedding.weight")


def test_convert_refuses_a_stride_zero_tensor_in_a_hugging_face_pytorch_model_bin(tmp_path, honest):
    import json

    hf = tmp_path / "hf"
    assert command("convert", honest["path"], hf).returncode == 0
    from safetensors.torch import load_file

    tensors = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    width = TOY_DIMS["n_text_state"]
    tensors["model.decoder.embed_tokens.weight"] = torch.zeros(1, width).expand(10**6, -1)
    torch.save(tensors, hf / "pytorch_model.bin")
    config = json.loads((hf / "config.json").read_text())
    config["vocab_size"] = 10**6
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.pt"
    done = command("convert", hf, out)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "embed_tokens")
    assert not out.exists()
    _refused_cheaply(hf / "pytorch_model.bin", honest, "embed_tokens",
                     load=f"whisper_rope.load_model({str(hf)!r}, device='cpu')")  # fmt: skip


def test_an_audio_header_claiming_days_of_samples_costs_only_what_decodes(tmp_path, honest):
    path = tmp_path / "lying.flac"
    sf.write(path, (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    fields = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate, channels, bits, then 36 bits of sample count
    data[18:26] = (fields | ((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).frames == (1 << 36) - 1  # libsndfile believes the header
    outcome = peak_memory(f"""
        from whisper_rope.audio import load_audio
        audio = load_audio({str(path)!r})
        outcome["samples"] = int(audio.shape[0])
    """)  # fmt: skip
    print(f"robustness: FLAC claiming 2**36 samples: {outcome['result']}, RSS growth {mib(outcome['growth'])}")
    assert outcome["result"] in ("ok", "refused"), outcome
    if outcome["result"] == "ok":
        assert outcome["samples"] == 16000
    assert outcome["growth"] <= SLACK, mib(outcome["growth"])


def test_a_wav_header_claiming_four_gigabytes_of_data_costs_only_what_is_there(tmp_path):
    path = tmp_path / "lying.wav"
    sf.write(path, (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    chunk = data.find(b"data")
    data[chunk + 4 : chunk + 8] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    outcome = peak_memory(f"""
        from whisper_rope.audio import load_audio
        outcome["samples"] = int(load_audio({str(path)!r}).shape[0])
    """)  # fmt: skip
    assert outcome["result"] == "ok" and outcome["samples"] == 16000, outcome
    assert outcome["growth"] <= SLACK
