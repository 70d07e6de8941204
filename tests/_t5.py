"""A tiny T5 checkpoint folder made on the fly (no download): a sentencepiece model trained on the captions with
SentencePieceTrainer (T5's special ids: pad 0, eos 1, unk 2, no bos) and a random T5EncoderModel from a T5Config,
saved like a real hub checkpoint (config.json, model.safetensors, spiece.model)."""
import os


def make_tiny_t5(folder, captions, d_model: int = 16, vocab_size: int = 64, seed: int = 0) -> str:
    import sentencepiece as spm
    import torch
    from transformers import T5Config, T5EncoderModel

    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(captions) * 4), model_prefix=os.path.join(folder, "spiece"),
                                   vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    os.remove(os.path.join(folder, "spiece.vocab"))
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size + 100, d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    T5EncoderModel(cfg).save_pretrained(folder)
    return str(folder)
