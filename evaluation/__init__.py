"""Evaluation: gFID / IS / precision / recall of generated samples, and rFID / PSNR / SSIM / LPIPS of a tokenizer.

A pure library: functions take images, models or callables; nothing here imports `tokenizer`, `generator` or
`pipelines` (tests/test_import_graph.py). The commands that load a pipeline / tokenizer and call these live on top:
pipelines/evaluate_generation.py, pipelines/evaluate_tokenizer.py, pipelines/compare.py.

    evaluation.metrics      Fréchet distance, IS, precision/recall (k=3), PSNR (two conventions), SSIM, ADM npz I/O,
                            torch-fidelity Inception features (pool_3, logits, ADM's spatial sFID features)
    evaluation.sample       (`mgvq evaluate-generation`) N class-balanced samples (seeded per image, sharded, resumable)
                            -> PNGs + ADM npz -> FID / sFID / IS / precision / recall
    evaluation.reconstruct  (`mgvq evaluate-tokenizer`) PSNR / SSIM / LPIPS / rFID / codebook usage / coarse-to-fine
                            PSNR
    evaluation.compare      (`mgvq compare`) the comparison table

Inception weights
    torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the FID Inception graph ported to PyTorch). It is not
    in any registry package. `--inception-weights auto` (evaluate-generation's default; evaluate-tokenizer skips rFID
    without a file unless given `auto`) uses $TORCH_HOME/hub/checkpoints/ if the file is there, else downloads it
    there; when it cannot, the error says what failed, the URL to fetch and where to put it.
    `--inception-weights FILE` uses that file. Missing weights fail at once, before any sampling.
    `metrics.save_random_inception_weights` writes random weights in the same format to exercise the code path
    offline: numbers from them are NOT FID/IS.

Reproducing LlamaGen / MGVQ-comparable numbers
    gFID (paper tables): LlamaGen and MGVQ report the ADM TensorFlow evaluator
    (openai/guided-diffusion/evaluations/evaluator.py) on 50,000 samples vs `VIRTUAL_imagenet256_labeled.npz`
    (ImageNet-train statistics mu/sigma + a 10k reference batch `arr_0` for precision/recall).
      1. `mgvq evaluate-generation --pipeline DIR --num-images 50000 --guidance-scale 2.0 --top-k ... --resize-to 256
         --ref VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception-2015-12-05-6726825d.pth \
         --out runs/eval`
         (24x24-token models generate at 384 and are resized to 256, LlamaGen-style: bicubic on the float tensor).
      2. The exact protocol: run ADM's evaluator on the written `runs/eval/samples.npz` (`arr_0`, uint8 NHWC):
         `python evaluator.py VIRTUAL_imagenet256_labeled.npz runs/eval/samples.npz`.
      Our in-process numbers use torch-fidelity's port of the same Inception graph with the reference npz's own mu/sigma
      for FID, so they track the ADM evaluator closely but are not bit-identical (resize kernel, float precision);
      quote the ADM evaluator's numbers when comparing with papers. IS uses 10 splits of N/10 (= ADM's 5000 at 50k).
      Precision/recall need the reference images (`arr_0` of the ref npz or an image folder), k = 3 like ADM.
    rFID: LlamaGen computes it against an **ImageNet-val** 50k npz (centre-crop 256), not VIRTUAL (VIRTUAL gives ~2x
      larger rFID). `mgvq evaluate-tokenizer --data IMAGENET_VAL_DIR --resolution 256` computes rFID between the
      centre-cropped originals and their reconstructions. MGVQ's own rFID uses clean-fid on PNG folders (a different
      resize), so expect small differences.
    PSNR: MGVQ reports PSNR of the dataset-mean MSE (`psnr_of_mean_mse`); LlamaGen the mean of per-image PSNR
      (`psnr_mean_of_images`). Both are reported. SSIM: skimage on uint8 HWC, channel_axis=-1, data_range=255 (MGVQ).
"""
