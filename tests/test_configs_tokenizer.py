"""The ImageNet tokenizer configs: what they train (the paper's DC-AE MGVQ in two stages, the VQGAN ablation) and a
smoke run of each through the same YAML, shrunk with key=value overrides (tiny widths, 32 px, 2 steps)."""
import json
from pathlib import Path

import pytest
import torch

from tokenizer import MGVQTokenizer
from tokenizer.model import preset_config
from tokenizer.quantizer import default_keep_probs
from tokenizer.train import load_config, main

CFG = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"
PAPER = {4: 8192, 8: 2048}  # G -> codes per group (C = 32)

# shrink any config to seconds on a CPU: data, size, steps, loss nets; the model keeps its G / K / C / masking
SMOKE = ["data=skimage", "num_crops=64", "image_size=32", "batch_size=4", "epochs=null", "steps=2", "num_workers=0",
         "num_samples=2", "log_every=1", "sample_every=2", "save_every=2", "loss.perceptual_weight=0",
         "loss.disc_ndf=8", "loss.disc_layers=1", "resume=null"]
TINY_DCAE = ["model_overrides.dcae.width_list=[8,8,16,16,32]", "model_overrides.dcae.encoder_depth_list=[0,1,1,1,1]",
             "model_overrides.dcae.decoder_depth_list=[0,1,1,1,1]", "model_overrides.dcae.attn_head_dim=8"]
TINY_VQGAN = ["model_overrides.vqgan.ch=8", "model_overrides.vqgan.num_res_blocks=1", "model_overrides.vqgan.z_channels=16"]


@pytest.mark.parametrize("g", [4, 8])
def test_paper_configs_are_the_released_architecture_in_two_stages(g):
    s1 = load_config(str(CFG / f"mgvq-f16c32-g{g}-imagenet-stage1.yaml"))
    s2 = load_config(str(CFG / f"mgvq-f16c32-g{g}-imagenet-stage2.yaml"))
    tc = preset_config(s1.model, **s1.model_overrides)
    assert (tc.backbone, tc.latent_dim, tc.groups, tc.codebook_size, tc.downsample) == ("dcae", 32, g, PAPER[g], 16)
    assert tc.grouped_quant_conv and tc.dead_code_reinit and tc.reinit_decay == 0.01
    # stage 1 masks (G=4: the paper's schedule; G=8: our assumption, written out in the YAML as a list)
    expected = [0.2, 0.1, 0.1, 0.6] if g == 4 else default_keep_probs(8)
    assert tc.nested_keep_probs == pytest.approx(expected, abs=1e-3)
    assert isinstance(s1.model_overrides["nested_keep_probs"], list)
    # stage 2 fine-tunes stage 1's output with masking off; together LlamaGen's 40 epochs at global batch 128
    assert s2.init_from == f"{s1.out_dir}/final_ema" and s1.ema
    assert s2.model_overrides == {"nested_keep_probs": None}
    assert (s1.epochs, s2.epochs, s1.batch_size * 8, s1.lr, s2.lr) == (30, 10, 128, 1e-4, 1e-4)
    assert (s1.loss_config().disc_start, s2.loss_config().disc_start) == (20000, 0)


@pytest.mark.parametrize("g", [4, 8])
def test_paper_configs_smoke_two_stages(tmp_path, g):
    s1 = tmp_path / "stage1"
    main(["--config", str(CFG / f"mgvq-f16c32-g{g}-imagenet-stage1.yaml"), *SMOKE, *TINY_DCAE, f"out_dir={s1}"])
    tok1 = MGVQTokenizer.from_pretrained(str(s1 / "final_ema"))
    assert tok1.config.backbone == "dcae" and tok1.config.groups == g and tok1.config.codebook_size == PAPER[g]
    assert tok1.config.nested_keep_probs is not None and len(tok1.config.nested_keep_probs) == g
    s2 = tmp_path / "stage2"
    main(["--config", str(CFG / f"mgvq-f16c32-g{g}-imagenet-stage2.yaml"), *SMOKE, f"init_from={s1 / 'final_ema'}",
          f"out_dir={s2}"])
    tok2 = MGVQTokenizer.from_pretrained(str(s2 / "final"))
    assert tok2.config.nested_keep_probs is None  # masking off in stage 2
    assert tok2.config.dcae == tok1.config.dcae  # the same (tiny) network, fine-tuned
    metrics = [json.loads(line) for line in open(s2 / "metrics.jsonl")]
    assert [m["keep_groups"] for m in metrics] == [g, g]  # every step trains all groups
    assert metrics[0]["disc_factor"] == 0.5  # the PatchGAN is on from step 0
    changed = [k for k, v in tok1.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, tok2.state_dict()[k])]
    assert changed  # stage 2 trained the stage-1 weights


@pytest.mark.parametrize("g", [4, 8])
def test_vqgan_ablation_configs_smoke(tmp_path, g):
    path = CFG / f"vqgan-f16-g{g}-imagenet-ablation.yaml"
    cfg = load_config(str(path))
    tc = preset_config(cfg.model, **cfg.model_overrides)
    assert (tc.backbone, tc.groups, tc.codebook_size, cfg.epochs) == ("vqgan", g, PAPER[g], 40)
    assert "ABLATION" in path.read_text().splitlines()[0]
    main(["--config", str(path), *SMOKE, *TINY_VQGAN, f"out_dir={tmp_path}"])
    tok = MGVQTokenizer.from_pretrained(str(tmp_path / "final"))
    assert tok.config.backbone == "vqgan" and tok.config.vqgan.ch == 8
