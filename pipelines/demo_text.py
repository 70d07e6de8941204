"""`mgvq demo --text`: text-to-image on Fashion-MNIST, the class demo's stages with captions instead of labels.

    mgvq demo --text                        # default profile (the class demo's budget), writes runs/demo-text/
    mgvq demo --text --quick --out /tmp/dt  # smoke run
    mgvq demo --text --out runs/demo        # beside a class demo: reuses its classifier/ and tokenizer/

Stages (a rerun reuses every finished stage with the same settings, like the class demo):
  1. classifier, 2. tokenizer   as `mgvq demo` (pipelines.demo's functions, same folders and settings)
  3. text encoder  a tiny T5 made here: a sentencepiece model trained on the caption vocabulary
                   (SentencePieceTrainer) + a RANDOM, frozen T5EncoderModel from a T5Config, saved like a hub
                   checkpoint (text_encoder_t5/). No pretrained T5 can be downloaded offline; with one (e.g.
                   google/flan-t5-base) the same code runs through --t5.
  4. codes         cache-codes with each image's caption (class name or a synonym in a template, fixed per image)
                   and its T5 features (fp16) in the same shards (codes_text/)
  5. generator     generator.train with model_overrides.conditioning=text: LlamaGen's t2i layout, caption prefix
                   with its padding mask, caption dropout 0.1 to the null caption (generator_text/)
  6. pipeline      MGVQPipeline(tokenizer, GPT, text_encoder=T5) -> pipeline_text/
  7. evaluation    per class, samples from captions of that class (the training templates / synonyms) with and
                   without CFG, classified by the demo's classifier: how often a sample is the caption's class

Outputs: metrics_text.json, README_text.md, samples_text_grid.png (one row per class, labelled with its prompt).
Honesty note: the T5 is random (no language understanding); the GPT learns which caption features go with which
images. Synonyms are separate captions to it; nothing here measures generalisation to unseen wordings.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pipelines import demo

SYNONYMS = [["t-shirt", "top", "tee"], ["trousers", "pants", "jeans"], ["pullover", "sweater", "jumper"],
            ["dress", "gown", "frock"], ["coat", "jacket", "overcoat"], ["sandal", "flip-flop", "summer sandal"],
            ["shirt", "blouse", "button-up shirt"], ["sneaker", "trainer", "running shoe"],
            ["bag", "handbag", "purse"], ["ankle boot", "boot", "bootie"]]
TEMPLATES = ["a photo of a {}", "a {}", "a black and white picture of a {}", "an image of a {} on a plain background",
             "{}", "a small grey {}"]
CAPTION_TOKENS = 32  # T5 tokens per caption (longest: 30); make_text_encoder checks that no caption is truncated
# the text demo keeps the settings it was measured with (README): 20k captioned images, 1400 generator steps, CFG 4.0
# (no top-k / temperature); the class demo's profile gives the rest (tokenizer, classifier, batch, lr, widths)
TEXT_SETTINGS = {"default": dict(cache_limit=20000, gen_steps=1400, guidance_scale=4.0, eval_per_class=50),
                 "quick": {}}
SPM_VOCAB = 120  # sentencepiece's cap; this small corpus yields about 80 pieces (many words split into letters)
T5_SIZE = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


def caption(i: int, label: int) -> str:
    """Image i's caption: a synonym of its class in a template, fixed per image (its index picks both)."""
    syn = SYNONYMS[label]
    return TEMPLATES[(i // len(syn)) % len(TEMPLATES)].format(syn[i % len(syn)])


def all_captions() -> list[str]:
    return [t.format(s) for syn in SYNONYMS for s in syn for t in TEMPLATES]


def make_text_encoder(folder: Path, seed: int) -> Path:
    """A tiny T5 checkpoint folder: sentencepiece model trained on the captions + a random T5 encoder."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    settings = {"t5": T5_SIZE, "seed": seed, "captions": len(all_captions()), "templates": TEMPLATES,
                "spm_vocab": SPM_VOCAB}
    if demo.stage_done(folder, settings, ["spiece.model", "model.safetensors"]):
        demo._log(f"text encoder: reusing {folder}")
        return folder
    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(all_captions() * 8), model_prefix=str(folder / "spiece"),
                                   vocab_size=SPM_VOCAB, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    longest = max(len(sp.encode(c)) + 1 for c in all_captions())  # + </s>
    if longest > CAPTION_TOKENS:  # truncation would cut the class word off the end of a caption
        raise RuntimeError(f"the longest caption has {longest} T5 tokens > CAPTION_TOKENS={CAPTION_TOKENS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(T5Config(vocab_size=sp.get_piece_size() + 100, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                **T5_SIZE)).save_pretrained(str(folder))
    demo.mark_done(folder, settings)
    return folder


def cache_caption_codes(out: Path, tok_dir: Path, data_path: Path, encoder, p: dict) -> Path:
    from pipelines.fashion_mnist import CLASSES
    from runtime.fingerprint import sha256_file, tokenizer_sha256
    from tokenizer import cache_codes as cc

    folder = out / "codes_text"
    t5 = Path(encoder.model.name_or_path)
    settings = {"tokenizer": tokenizer_sha256(tok_dir), "limit": p["cache_limit"], "data": str(data_path),
                "t5": sha256_file(str(t5 / "model.safetensors")) if (t5 / "model.safetensors").is_file() else str(t5),
                "captions": TEMPLATES}
    if demo.stage_done(folder, settings, ["meta.json"]):
        demo._log(f"caption codes: reusing {folder}")
        return folder
    cc.run(tokenizer=str(tok_dir), data=str(data_path), split="train", out=str(folder), batch_size=256,
           num_workers=0, shard_size=8192, limit=p["cache_limit"], class_names=CLASSES, caption_fn=caption,
           caption_desc="pipelines.demo_text.caption", caption_features_fn=encoder,
           caption_features_desc={"encoder": str(t5)})
    demo.mark_done(folder, settings)
    return folder


def train_text_generator(out: Path, codes_dir: Path, p: dict, seed: int) -> Path:
    from generator.train import TrainConfig, train

    folder = out / "generator_text"
    with open(codes_dir / "meta.json") as f:
        meta = json.load(f)
    settings = {"steps": p["gen_steps"], "batch": p["gen_batch"], "lr": p["gen_lr"], "args": p["gen_args"],
                "seed": seed, "codes": meta["tokenizer"]["weights_sha256"], "captions": meta["captions"],
                "codes_stage": json.loads((codes_dir / demo.STAGE_FILE).read_text())}
    if demo.stage_done(folder, settings, ["final/model.safetensors"]):
        demo._log(f"text generator: reusing {folder / 'final'}")
        return folder / "final"
    model_args = {**p["gen_args"], "head": "parallel", "token_dropout_p": 0.0, "resid_dropout_p": 0.0,
                  "ffn_dropout_p": 0.0, "class_dropout_prob": 0.1, "conditioning": "text",
                  "caption_tokens": CAPTION_TOKENS}
    cfg = TrainConfig(model="GPT-tiny", model_overrides=model_args, data=str(codes_dir), view="random",
                      num_workers=0, global_batch_size=p["gen_batch"], batch_size=p["gen_batch"], lr=p["gen_lr"],
                      lr_schedule="cosine", warmup_steps=p["gen_warmup"], min_lr=p["gen_lr"] * 0.05,
                      weight_decay=0.05, steps=p["gen_steps"], precision="fp32", out_dir=str(folder),
                      resume="none", save_every=p["gen_steps"], keep_checkpoints=1, log_every=10, log_with="none",
                      sample_every=0, sample_cfg_scale=p["guidance_scale"], seed=seed)
    train(cfg)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    demo.mark_done(folder, settings)
    return folder / "final"


def eval_prompts(per_class: int) -> list[tuple[str, int]]:
    """(prompt, class) pairs: per class, `per_class` prompts cycling through its synonyms x templates."""
    pairs = []
    for c, syn in enumerate(SYNONYMS):
        combos = [t.format(s) for t in TEMPLATES for s in syn]
        pairs += [(combos[j % len(combos)], c) for j in range(per_class)]
    return pairs


def sample_and_score(pipe, clf, names, x_test, p: dict, seed: int, device: str, out: Path,
                     timer: "demo._Timer") -> dict:
    from pipelines.classifier import classifier_fd, predict

    t0 = time.time()
    pairs = eval_prompts(p["eval_per_class"])
    prompts, y = [q for q, _ in pairs], torch.tensor([c for _, c in pairs])
    gen = {}
    for tag, s in (("cfg", p["guidance_scale"]), ("no_cfg", 1.0)):
        demo._log(f"sampling {len(prompts)} images from captions, guidance {s}")
        gen[tag] = pipe(prompt=prompts, guidance_scale=s, generator=torch.Generator(device).manual_seed(seed),
                        output_type="pt", batch_size=500).images
    timer.tick("sampling", t0)
    # grid: one row per class, all from its first prompt, labelled with it
    row_prompts = [t.format(syn[0]) for t, syn in zip(["a photo of a {}"] * len(SYNONYMS), SYNONYMS)]
    g = pipe(prompt=row_prompts, num_images_per_label=p["grid_cols"], guidance_scale=p["guidance_scale"],
             generator=torch.Generator(device).manual_seed(seed + 1), output_type="pt").images
    grid_size = demo.save_grid(g, out / "samples_text_grid.png", ncol=p["grid_cols"], row_labels=row_prompts)
    _, real_feats = predict(clf, x_test)
    res = {"guidance_scale": p["guidance_scale"], "num_samples": len(prompts), "per_class": p["eval_per_class"],
           "grid_prompts": row_prompts, "samples_text_grid_size": list(grid_size)}
    for tag, imgs in gen.items():
        logits, feats = predict(clf, imgs)
        pred = logits.argmax(-1)
        res[f"caption_class_accuracy_{tag}"] = float((pred == y).float().mean())
        res[f"per_class_accuracy_{tag}"] = {names[c]: float((pred[y == c] == c).float().mean())
                                            for c in range(len(names))}
        res[f"classifier_fd_{tag}"] = classifier_fd(real_feats, feats)
    demo._log(f"samples classified as the caption's class: {res['caption_class_accuracy_cfg']:.3f} with CFG "
              f"{p['guidance_scale']}, {res['caption_class_accuracy_no_cfg']:.3f} without")
    return res


def write_readme(out: Path, m: dict) -> None:
    g = m["generation"]
    lines = [
        "# mgvq demo --text: Fashion-MNIST text-to-image on a CPU", "",
        f"Profile `{m['profile']}`, seed {m['seed']}, total {m['timings_s']['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in m['timings_s'].items() if k != 'total')}).", "",
        f"- `samples_text_grid.png`: one row per class, each labelled with its prompt; CFG {g['guidance_scale']}",
        f"- samples classified as the caption's class ({g['num_samples']} samples, {g['per_class']} captions per "
        f"class): **{g['caption_class_accuracy_cfg']:.3f}** with CFG {g['guidance_scale']}, "
        f"**{g['caption_class_accuracy_no_cfg']:.3f}** without (classifier test accuracy "
        f"{m['classifier']['test_accuracy']:.3f}; chance 0.1)",
        f"- classifier FD: {g['classifier_fd_cfg']:.2f} with CFG, {g['classifier_fd_no_cfg']:.2f} without",
        f"- generator: {m['generator']['num_parameters'] / 1e6:.2f} M parameters, final train loss "
        f"{m['generator']['final_loss']}", "",
        "The T5 encoder is random (made offline from a T5Config); the GPT learns the caption features of the "
        "training captions. Same wordings at evaluation as in training.", "",
        "```python", "from pipelines import MGVQPipeline",
        f"pipe = MGVQPipeline.from_pretrained({str(out / 'pipeline_text')!r})",
        "images = pipe(prompt=['a photo of a sneaker', 'a handbag'], guidance_scale=4.0).images", "```", ""]
    (out / "README_text.md").write_text("\n".join(lines))


def run(args) -> int:
    """`mgvq demo --text` (args: pipelines.demo's parsed arguments)."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads={args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    profile = "quick" if args.quick else "default"
    p, out, timer = demo.PROFILES[profile] | TEXT_SETTINGS[profile], Path(args.out), demo._Timer()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_path = demo.find_data(args.data_dir)
    x_train, y_train, names = demo.load_split(data_path, "train", p["num_train"])
    x_test, y_test, _ = demo.load_split(data_path, "test", p["num_test"])
    timer.tick("data", t0)

    from pipelines.classifier import load_or_train
    from pipelines.text_encoder import T5TextEncoder

    t0 = time.time()
    clf, clf_info = load_or_train(str(out / "classifier"), x_train, y_train, x_test, y_test, steps=p["clf_steps"],
                                  batch_size=p["clf_batch"], seed=args.seed)
    timer.tick("classifier", t0)
    t0 = time.time()
    tok_dir = demo.train_tokenizer(out, data_path, p, args.seed)
    timer.tick("tokenizer", t0)
    t0 = time.time()
    t5_dir = Path(args.t5) if args.t5 else make_text_encoder(out / "text_encoder_t5", args.seed)
    encoder = T5TextEncoder.from_pretrained(str(t5_dir), max_length=CAPTION_TOKENS, device="cpu")
    codes_dir = cache_caption_codes(out, tok_dir, data_path, encoder, p)
    timer.tick("cache_caption_codes", t0)
    t0 = time.time()
    gen_dir = train_text_generator(out, codes_dir, p, args.seed)
    timer.tick("text_generator", t0)

    from generator import GPT
    from pipelines import MGVQPipeline
    from tokenizer import MGVQTokenizer

    pipe = MGVQPipeline(MGVQTokenizer.from_pretrained(str(tok_dir)), GPT.from_pretrained(str(gen_dir)),
                        text_encoder=encoder, sampling_defaults={"guidance_scale": p["guidance_scale"]})
    pipe.save_pretrained(str(out / "pipeline_text"))
    pipe = MGVQPipeline.from_pretrained(str(out / "pipeline_text")).to(args.device)
    generation = sample_and_score(pipe, clf, names, x_test, p, args.seed, args.device, out, timer)
    gen_log = demo.read_jsonl(out / "generator_text" / "metrics.jsonl")
    timer.timings["total"] = round(time.time() - timer.start, 1)
    metrics = {"profile": profile, "seed": args.seed, "device": args.device, "torch_threads": torch.get_num_threads(),
               "class_names": names, "classifier": {"test_accuracy": clf_info["test_accuracy"]},
               "text_encoder": {"path": str(t5_dir), "max_length": CAPTION_TOKENS, "dim": encoder.dim,
                                "random": not args.t5},
               "generator": {"num_parameters": pipe.generator.num_parameters(), "steps": p["gen_steps"],
                             "final_loss": gen_log[-1]["loss"] if gen_log else None},
               "generation": generation, "timings_s": timer.timings}
    with open(out / "metrics_text.json", "w") as f:
        json.dump(metrics, f, indent=2)
    write_readme(out, metrics)
    demo._log(f"done in {timer.timings['total']:.0f} s: {out / 'metrics_text.json'}, {out / 'samples_text_grid.png'},"
              f" pipeline in {out / 'pipeline_text'}")
    return 0


if __name__ == "__main__":
    sys.exit(demo.main(["--text", *sys.argv[1:]]))
