"""T5 text encoder through transformers: a sentencepiece model trained on the fly + a random tiny T5, loaded from a
local folder through T5Tokenizer / T5EncoderModel like a real FLAN-T5 checkpoint."""
import pytest
import torch

from _t5 import make_tiny_t5
from pipelines.text_encoder import T5TextEncoder, left_pad

CAPTIONS = ["a photo of a sneaker", "a black bag", "an ankle boot, black and white", "a shirt", "a dress"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"), CAPTIONS)


def test_load_from_folder_frozen_and_left_padded(t5_dir):
    from transformers import T5Tokenizer

    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=12, device="cpu")
    assert isinstance(enc.tokenizer, T5Tokenizer) and enc.dim == 16
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    prompts = ["a black bag", "an ankle boot, black and white, a photo of a sneaker and a shirt and a dress"]
    feats, mask = enc(prompts)
    assert feats.shape == (2, 12, 16) and feats.dtype == torch.float32 and mask.dtype == torch.bool
    ids = enc.tokenizer(prompts)["input_ids"]
    n = [min(len(i), 12) for i in ids]
    assert ids[0][-1] == enc.tokenizer.eos_token_id
    assert mask.sum(1).tolist() == n and n[1] == 12  # the long caption is truncated to max_length
    for b in range(2):  # left-padded: valid tokens last, padding rows zero
        assert mask[b, 12 - n[b]:].all() and not mask[b, :12 - n[b]].any()
        assert (feats[b, :12 - n[b]] == 0).all()
    # the valid rows are T5's output for the caption alone (no padding): padding does not leak in
    ids0 = torch.tensor([ids[0]])
    alone = enc.model(input_ids=ids0).last_hidden_state[0]
    torch.testing.assert_close(feats[0, 12 - n[0]:], alone, atol=1e-5, rtol=1e-5)
    # round trip through save_pretrained (tokenizer.json + weights)
    out = t5_dir + "_saved"
    enc.save_pretrained(out)
    feats2, mask2 = T5TextEncoder.from_pretrained(out, max_length=12, device="cpu")(prompts)
    assert torch.equal(mask2, mask)
    torch.testing.assert_close(feats2, feats, atol=1e-6, rtol=0)


def test_bfloat16_and_errors(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=8, device="cpu", dtype="bfloat16")
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    feats, mask = enc("a shirt")
    assert feats.shape == (1, 8, 16) and feats.dtype == torch.float32 and mask[0, -1]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        T5TextEncoder.from_pretrained("./no/such/t5")
    with pytest.raises(ValueError, match="non-empty list of strings"):
        enc([])


def test_left_pad_moves_rows_and_refuses_holes():
    f = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1) + 1
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out, mask = left_pad(f, m)
    assert out[:, :, 0].tolist() == [[0, 0, 1, 2], [5, 6, 7, 8]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]
    with pytest.raises(ValueError, match="prefix"):
        left_pad(f, torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]))
