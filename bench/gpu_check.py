"""A GPU check in one command: what the method costs on the card you have.

- the 7-expert mixture (the released architecture, random weights) scoring 512 px images with the
  Predictor: images/s and peak GPU memory, fp32 and bf16;
- training one step per original backbone at 512 px in bf16, with and without gradient
  checkpointing: images/s and peak GPU memory;
- Stable Diffusion 1.5-shaped img2img at 512 px in fp16 (the real UNet / VAE / text-encoder configs
  with random weights): seconds per image;
- embedding (notebook 01's lite0) images/s.

    python bench/gpu_check.py            # on a GPU machine: the figures for bench/RESULTS.md
    python bench/gpu_check.py --dry      # tiny sizes on whatever device there is (the tests run this)

Without a GPU the full run still works on the CPU, slowly; memory figures are then peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

ORIGINAL = ["convnextv2_tiny.fcmae_ft_in1k", "tf_efficientnet_b4.ns_jft_in1k", "tf_efficientnet_b5.ns_jft_in1k",
            "tf_efficientnet_b6.ns_jft_in1k"]
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, sample_size=512)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS of the process on a CPU


def _timed(device: torch.device, fn, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, memory pools filled
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def predictor_rows(device, size: int, batch: int, backbones: list[str], repeats: int) -> list[dict]:
    from dfd_lib.models.checkpoints import MixtureConfig
    from dfd_lib.models.experts import build_mixture
    from dfd_lib.scoring.predictor import Predictor

    rows = []
    for bf16 in ([False, True] if device.type == "cuda" else [False]):
        model = build_mixture(backbones)
        predictor = Predictor(model, MixtureConfig(backbones, image_size=size), device=device, batch_size=batch, bf16=bf16)
        x = torch.randn(batch, 3, size, size)
        _reset_peak(device)
        seconds = _timed(device, lambda predictor=predictor, x=x: predictor.predict_tensor(x), repeats)
        rows.append({"what": f"predictor {len(backbones)} experts {'bf16' if bf16 else 'fp32'}", "size": size, "batch": batch,
                     "images_per_s": batch / seconds, "peak_mib": _peak_mib(device)})
        del predictor, model
    return rows


def training_rows(device, size: int, batch: int, backbones: list[str], repeats: int) -> list[dict]:
    from dfd_lib.models.experts import Expert
    from dfd_lib.training.losses import MultiLoss

    rows = []
    half = device.type == "cuda"
    for backbone in backbones:
        for checkpointing in (False, True):
            expert = Expert(backbone, pretrained=False).to(device).train()
            expert.baseline_extractor.set_grad_checkpointing(checkpointing)
            optimizer = torch.optim.AdamW(expert.parameters(), lr=1e-4)
            images = torch.randn(batch, 3, size, size, device=device)
            labels = torch.tensor([i % 2 for i in range(batch)], device=device)
            loss_fn = MultiLoss()

            def step(expert=expert, optimizer=optimizer, images=images, labels=labels, loss_fn=loss_fn):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                    losses = loss_fn(expert, images, labels)
                losses["overall"].backward()
                optimizer.step()

            _reset_peak(device)
            seconds = _timed(device, step, repeats)
            rows.append({"what": f"train {backbone} {'bf16' if half else 'fp32'}{' + checkpointing' if checkpointing else ''}",
                         "size": size, "batch": batch, "images_per_s": batch / seconds, "peak_mib": _peak_mib(device)})
            del expert, optimizer
    return rows


def diffusion_row(device, size: int, dry: bool) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from PIL import Image

    from dfd_lib.synth import diffusion

    if dry:
        pipe = diffusion.build_tiny_pipeline("img2img")
    else:
        tiny = diffusion.build_tiny_pipeline("img2img")  # its tokenizer and text encoder stand in for CLIP's
        pipe = StableDiffusionImg2ImgPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
            unet=UNet2DConditionModel(**{**SD15_UNET, "cross_attention_dim": tiny.text_encoder.config.hidden_size}),
            scheduler=PNDMScheduler(skip_prk_steps=True), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (size, size), (120, 90, 60))
    steps = 4 if dry else 30
    _reset_peak(device)
    seconds = _timed(device, lambda: diffusion.generate(pipe, [image], ["a photo"], [0], strength=0.6, steps=steps, size=size), 1)
    return {"what": f"stable diffusion img2img {'tiny' if dry else 'SD-1.5 shape'} {steps} steps x 0.6", "size": size, "batch": 1,
            "images_per_s": 1 / seconds, "peak_mib": _peak_mib(device)}


def embedding_row(device, size: int, batch: int, repeats: int) -> dict:
    from dfd_lib.models.backbones import create_backbone

    model = create_backbone("tf_efficientnet_lite0", num_classes=0).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        _reset_peak(device)
        seconds = _timed(device, lambda: model(x), repeats)
    return {"what": "embedding lite0", "size": size, "batch": batch, "images_per_s": batch / seconds, "peak_mib": _peak_mib(device)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes and test backbones: checks the script runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = _device()
    if args.dry:
        size, batch, repeats, backbones, experts = 32, 2, 1, ["test_efficientnet"], ["test_efficientnet"] * 2
    else:
        size, batch, repeats, backbones = 512, 16, 5, ORIGINAL
        experts = [ORIGINAL[0], ORIGINAL[0], ORIGINAL[1], ORIGINAL[1], ORIGINAL[2], ORIGINAL[2], ORIGINAL[3]]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {'dry run' if args.dry else 'full sizes'}")
    rows = predictor_rows(device, size, batch, experts, repeats)
    rows += training_rows(device, size, 2 if args.dry else 8, backbones, repeats)
    rows.append(diffusion_row(device, 64 if args.dry else 512, args.dry))
    rows.append(embedding_row(device, 32 if args.dry else 224, batch * 4, repeats))
    print(f"{'what':64s} {'px':>5s} {'batch':>6s} {'img/s':>9s} {'peak MiB':>10s}")
    for row in rows:
        print(f"{row['what']:64s} {row['size']:5d} {row['batch']:6d} {row['images_per_s']:9.2f} {row['peak_mib']:10.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
