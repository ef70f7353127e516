"""Tiny random-weight diffusers base models of the real architectures, built offline (nothing is
downloaded), and latent caches of them written the way ``encode --base`` writes them: the
pipeline's own ``encode_prompt`` and VAE posterior mean, real tar shards and a real manifest."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

# Stable Diffusion 1.5's scheduler config (its PNDM scheduler; the betas are what matter)
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
WIDTH = 32  # text width of the stand-in CLIP encoders
PROMPTS = ["a photo of a cat", "a red dog", "a green tree", "a cat on a tree", "a dog in the snow", "a blue sky"]


def tiny_unet(family: str = "sd", seed: int = 0, in_channels: int = 4):
    """A UNet2DConditionModel of the SD 1.x (``sd``) or SDXL (``sdxl``: text_time added
    conditioning on pooled text + 6 time ids) architecture, at a tiny size (``in_channels`` 9:
    SD's inpainting UNet, latent + mask + masked-image latent)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw: dict = {}
    if family == "sdxl":
        kw = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": WIDTH + 6 * 8,
            "cross_attention_dim": 2 * WIDTH,
            "transformer_layers_per_block": (1, 2),
            "use_linear_projection": True,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=kw.pop("cross_attention_dim", WIDTH),
        attention_head_dim=8,
        norm_num_groups=8,
        **kw,
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )


def sd_pipeline(root, seed: int = 0, *, inpaint: bool = False, unet_channels: int = 0):
    """A tiny StableDiffusionPipeline (stand-in CLIP text encoder with its tokenizer), or with
    ``inpaint`` a StableDiffusionInpaintPipeline of the same parts with SD's 9-channel inpainting
    UNet (``unet_channels`` another count: 4 is a text-to-image UNet in an inpainting folder)."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel

    from pipeline.models.text import build_stand_in

    text_dir = build_stand_in(str(root / f"text{seed}"), PROMPTS, kind="clip", width=WIDTH, seed=seed)
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=tiny_vae(seed),
        text_encoder=CLIPTextModel.from_pretrained(text_dir),
        tokenizer=AutoTokenizer.from_pretrained(text_dir),
        unet=tiny_unet("sd", seed, in_channels=unet_channels or (9 if inpaint else 4)),
        scheduler=PNDMScheduler.from_config(SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(root, seed: int = 0):
    """A tiny StableDiffusionXLPipeline: two stand-in CLIP encoders (the second with a projection,
    so its pooled ``text_embeds``), the SDXL UNet architecture."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.models.text import build_stand_in

    one = build_stand_in(str(root / f"xl1_{seed}"), PROMPTS, kind="clip", width=WIDTH, seed=seed)
    two = build_stand_in(str(root / f"xl2_{seed}"), PROMPTS, kind="clip", width=WIDTH, seed=seed + 1)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=CLIPTextModel.from_pretrained(one),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(two, projection_dim=WIDTH),
        tokenizer=AutoTokenizer.from_pretrained(one),
        tokenizer_2=AutoTokenizer.from_pretrained(two),
        unet=tiny_unet("sdxl", seed),
        scheduler=EulerDiscreteScheduler.from_config({**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(pipe, path) -> str:
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random RGB images in [-1, 1], (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def write_cache(pipe, base_dir: str, out: str, n: int = 12, per_shard: int = 4, size: int = 64, seed: int = 0) -> str:
    """A latent cache of ``n`` images of ``pipe`` as ``encode --base`` writes it: raw posterior
    means (C, h, w) and the pipeline's own prompt embeddings, float16, in tar shards; a manifest
    whose ``base`` records the base's family and conditioning identity; the empty caption."""
    from pipeline.io import manifest, storage
    from pipeline.io.tarshards import TarShardWriter, npy_bytes
    from pipeline.models import base as basemod

    base = basemod.open_base(base_dir)
    family = base.family
    os.makedirs(out, exist_ok=True)
    ims = images(n, size, seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def embed(texts):
        if family == "sdxl":
            e, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
            return e, pooled
        e, _ = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return e, None

    records = []
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}.tar"
        buf = io.BytesIO()
        idx = list(range(s, min(n, s + per_shard)))
        latents = pipe.vae.encode(ims[idx]).latent_dist.mean
        embeds, pooled = embed([prompts[i] for i in idx])
        with TarShardWriter(buf) as w:
            for j, i in enumerate(idx):
                fields = {
                    "latent.npy": npy_bytes(latents[j].numpy().astype(np.float16)),
                    "prompt_embeds.npy": npy_bytes(embeds[j].numpy().astype(np.float16)),
                    "json": json.dumps(
                        {
                            "original_size": [size + 16, size + 8],
                            "crop_box": [8, 4, 8 + size, 4 + size],
                            "bucket": [size, size],
                        }
                    ).encode(),
                }
                if pooled is not None:
                    fields["pooled_prompt_embeds.npy"] = npy_bytes(pooled[j].numpy().astype(np.float16))
                w.write(f"img{i:04d}", fields)
        data = buf.getvalue()
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        records.append(
            {
                "shard": name,
                "samples": len(idx),
                "bytes": len(data),
                "sha256": storage.sha256_file(os.path.join(out, name)),
                "seen": len(idx),
                "written": len(idx),
                "skipped": {},
                "errors": [],
            }
        )
    empty, empty_pooled = embed([""])
    os.makedirs(os.path.join(out, "_empty_caption"), exist_ok=True)
    np.save(os.path.join(out, "_empty_caption", "prompt_embeds.npy"), empty[0].numpy().astype(np.float16))
    if empty_pooled is not None:
        np.save(
            os.path.join(out, "_empty_caption", "pooled_prompt_embeds.npy"), empty_pooled[0].numpy().astype(np.float16)
        )
    vae = pipe.vae.config
    man = manifest.build(
        records,
        encoder={"kind": "diffusers-base", "name": "vae"},
        scale=float(vae.scaling_factor),
        shift=float(vae.shift_factor or 0.0),
        latent_shape=list(latents.shape[1:]),
        latent_dtype="float16",
        preprocessing={"resolution": size},
        tasks=[],
        config={"base": base_dir},
    )
    man["fields"] = ["latent.npy", "prompt_embeds.npy", "json"] + (
        ["pooled_prompt_embeds.npy"] if family == "sdxl" else []
    )
    empty_files = {"prompt_embeds.npy": "_empty_caption/prompt_embeds.npy"}
    if empty_pooled is not None:
        empty_files["pooled_prompt_embeds.npy"] = "_empty_caption/pooled_prompt_embeds.npy"
    man["base"] = {"identity": base.folder.identity, "family": family, "empty_caption": empty_files}
    manifest.write(out, man, records)
    return out
