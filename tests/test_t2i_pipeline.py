"""MGVQPipeline prompt path: pipe(prompt=..., negative_prompt=..., guidance_scale=...) == generator.generate on the
T5 features, save / load with the text encoder inside, `mgvq sample --prompt`, and clear errors."""
import pytest
import torch

from _t5 import make_tiny_t5
from generator import GPT, generate
from pipelines import MGVQPipeline
from pipelines.text_encoder import T5TextEncoder
from tokenizer import MGVQTokenizer

PROMPTS = ["a black ankle boot", "a bag", "a white sneaker on the floor"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2ipipe")
    torch.manual_seed(0)
    tok = MGVQTokenizer.from_preset("mgvq-tiny").eval()
    gpt = GPT.from_preset("GPT-tiny", grid=8, groups=4, codebook_size=256, conditioning="text", caption_dim=16,
                          caption_tokens=10).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.3)
    enc = T5TextEncoder.from_pretrained(make_tiny_t5(base / "t5", PROMPTS + ["blurry"]), max_length=8, device="cpu")
    return MGVQPipeline(tok, gpt, text_encoder=enc), base


def test_prompt_path_equals_generate_on_t5_features(pipe):
    p, _ = pipe
    out = p(prompt=PROMPTS, guidance_scale=2.0, top_k=1, output_type="pt", progress=False)
    assert out.images.shape == (3, 3, 32, 32) and out.codes.shape == (3, 8, 8, 4)
    feats, mask = p.text_encoder(PROMPTS)  # (3, 8, 16): the GPT left-pads them to its 10 caption tokens
    want = generate(p.generator, feats, cond_mask=mask, guidance_scale=2.0, top_k=1)
    assert torch.equal(out.codes, want)
    neg = p(prompt=PROMPTS, negative_prompt="blurry", guidance_scale=2.0, top_k=1, output_type="pt", progress=False)
    nf, nm = p.text_encoder(["blurry"] * 3)
    assert torch.equal(neg.codes, generate(p.generator, feats, cond_mask=mask, guidance_scale=2.0, top_k=1,
                                           negative_cond=nf, negative_cond_mask=nm))
    assert not torch.equal(neg.codes, out.codes)
    # num_images_per_label repeats each prompt; per-image generators make each image independent of the batch
    two = p(prompt=PROMPTS[:2], num_images_per_label=2, generator=[torch.Generator().manual_seed(s) for s in range(4)],
            output_type="pt", progress=False, guidance_scale=3.0)
    one = p(prompt=PROMPTS[1], generator=[torch.Generator().manual_seed(3)], output_type="pt", progress=False,
            guidance_scale=3.0)
    assert torch.equal(two.codes[3], one.codes[0])


def test_save_load_and_cli(pipe, tmp_path):
    p, _ = pipe
    p.save_pretrained(str(tmp_path / "pipe"))
    q = MGVQPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert q.text_encoder is not None and q.text_encoder.max_length == 8
    a = p(prompt=PROMPTS, top_k=1, output_type="pt", progress=False).codes
    assert torch.equal(q(prompt=PROMPTS, top_k=1, output_type="pt", progress=False).codes, a)
    from pipelines.sample import main

    assert main(["--pipeline", str(tmp_path / "pipe"), "--prompt", *PROMPTS[:2], "--n", "2",
                 "--negative-prompt", "blurry", "--out", str(tmp_path / "s.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "s.png").size[0] > 32
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "x.png")])


def test_errors_name_the_path(pipe):
    p, _ = pipe
    with pytest.raises(ValueError, match="takes prompt="):
        p([0, 1])
    with pytest.raises(ValueError, match="negative_prompt: 2 prompts for 3"):
        p(prompt=PROMPTS, negative_prompt=["a", "b"])
    no_enc = MGVQPipeline(p.tokenizer, p.generator)
    with pytest.raises(ValueError, match="no text encoder"):
        no_enc(prompt="a bag")
    torch.manual_seed(0)
    cls_gpt = GPT.from_preset("GPT-tiny", grid=8, groups=4, codebook_size=256, num_classes=3).eval()
    cls_pipe = MGVQPipeline(p.tokenizer, cls_gpt)
    with pytest.raises(ValueError, match="class-conditional"):
        cls_pipe(prompt="a bag")
    with pytest.raises(ValueError, match="text-conditional generators"):
        MGVQPipeline(p.tokenizer, cls_gpt, text_encoder=p.text_encoder)
    assert cls_pipe([0, 2], progress=False).codes.shape == (2, 8, 8, 4)  # the class path is unchanged
