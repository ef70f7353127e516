"""``encode --base``: a diffusers pipeline folder as the base model. Tiny random-weight pipelines
of the real architectures are built offline (CLIP BPE tokenizers from the ``tokenizers``
library), saved with safetensors, encoded by a real ``encode --base`` run on the session's Ray,
and the stored conditioning is compared with ``encode_prompt`` of the pipeline as diffusers
itself loads it."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import encode_image, photo_crops, write_tar
from pipeline import cli
from pipeline.io import imaging, storage
from pipeline.io.tarshards import iter_samples
from pipeline.models import base_model
from pipeline.stages import encode_worker
from pipeline.stages.encode import EncodeConfig, run_encode

RESOLUTION = 32
CAPTIONS = {
    "cat": "a photo of a cat",
    "dog": "A Dog on the grass, at noon",
    "empty": "",
    # ~100 character-level tokens: truncated at the tokenizers' 77
    "long": "a very long caption about a red house by the sea with many windows and a small garden in front of it",
}
SIZES = {"cat": (96, 64), "dog": (64, 80), "empty": (48, 48), "long": (40, 72)}


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _clip_tokenizer(pad: str = "<|endoftext|>"):
    """A real ``CLIPTokenizer`` (byte-level BPE with CLIP's ``</w>`` suffix, built on the
    ``tokenizers`` library) over a tiny vocabulary: every byte character and a few merges."""
    import transformers
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "f</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad)


def _clip(tok, width: int, seed: int, projection: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _vae(scaling: float, seed: int, shift: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=scaling,
        shift_factor=shift,
    )


def _unet(cross: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def build_sd(path: str, seed: int = 0) -> str:
    """A tiny StableDiffusionPipeline (SD 1.x layout: CLIP ViT-L-style encoder, 77 tokens)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tok = _clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(0.18215, seed),
        text_encoder=_clip(tok, 32, seed + 1),
        tokenizer=tok,
        unet=_unet(32),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_sdxl(path: str, seed: int = 0) -> str:
    """A tiny StableDiffusionXLPipeline: CLIP-L-style and CLIP-G-style (with projection, pad
    token "!" as SDXL's tokenizer_2) encoders, a text-time conditioned UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok2 = _clip_tokenizer(), _clip_tokenizer(pad="!")
    te2 = _clip(tok2, 48, seed + 2, projection=24)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025, seed),
        text_encoder=_clip(tok, 32, seed + 1),
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=_unet(
            32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 24,
        ),
        scheduler=EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _t5_tokenizer():
    """A real ``T5Tokenizer`` (Unigram on the ``tokenizers`` library) over the captions' words
    and single characters."""
    import transformers

    words = sorted({w.strip(",").lower() for c in CAPTIONS.values() for w in c.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_pixart(path: str, seed: int = 0) -> str:
    """A tiny PixArtSigmaPipeline: a T5 encoder, a PixArt transformer (learned variance: 8 output
    channels for 4 latent channels)."""
    import transformers
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed + 1)
    t5 = transformers.T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        patch_size=2,
        caption_channels=32,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=transformers.T5EncoderModel(t5).eval(),
        vae=_vae(0.13025, seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _t5(tok, width: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tok),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return transformers.T5EncoderModel(config).eval()


def build_sd3(path: str, seed: int = 0) -> str:
    """A tiny StableDiffusion3Pipeline: CLIP-L- and CLIP-G-style encoders (both with projection,
    widths 32 and 48), a T5 of width 96 (wider than both CLIPs together), an SD3 transformer and
    a VAE with a shift factor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(pad="!"), _t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=96,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 24,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, seed, shift=0.0609),
        text_encoder=_clip(tok, 32, seed + 1, projection=16),
        tokenizer=tok,
        text_encoder_2=_clip(tok2, 48, seed + 2, projection=24),
        tokenizer_2=tok2,
        text_encoder_3=_t5(tok3, 96, seed + 3),
        tokenizer_3=tok3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "pixart": build_pixart, "sd3": build_sd3}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {name: build(str(root / name)) for name, build in BUILDERS.items()}


def _images() -> dict[str, bytes]:
    crops = photo_crops(len(SIZES), size=96, seed=3)
    return {key: encode_image(crop.resize(size)) for (key, size), crop in zip(SIZES.items(), crops)}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("images") / "s.tar")
    members = []
    for key, png in _images().items():
        members.append((f"{key}.png", png))
        if CAPTIONS[key]:
            members.append((f"{key}.txt", CAPTIONS[key].encode()))
    write_tar(path, members)
    return path


def meta_tokens(fields: dict) -> int:
    return json.loads(fields["json"])["text"]["base"]["tokens"]


def _diffusers_pipeline(path: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, family: str, caption: str) -> dict[str, np.ndarray]:
    """``encode_prompt`` of the pipeline for one caption: its own and the negative (guidance) embeddings."""
    with torch.no_grad():
        if family == "sd":
            embeds, negative = pipe.encode_prompt(caption, "cpu", 1, True)
            return {"embeds": embeds[0].numpy(), "negative": negative[0].numpy()}
        if family == "pixart":
            embeds, mask, negative, negative_mask = pipe.encode_prompt(caption, True, device="cpu")
            return {
                "embeds": embeds[0].numpy(),
                "mask": mask[0].numpy(),
                "negative": negative[0].numpy(),
                "negative_mask": negative_mask[0].numpy(),
            }
        if family == "sd3":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=caption, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True
            )
        else:
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=caption, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
    return {
        "embeds": embeds[0].numpy(),
        "negative": negative[0].numpy(),
        "pooled": pooled[0].numpy(),
        "negative_pooled": negative_pooled[0].numpy(),
    }


FP16 = {"rtol": 1e-3, "atol": 1e-3}  # float16 rounding of values of order 1


@pytest.mark.parametrize("family", list(BUILDERS))
def test_encode_base_stores_the_pipelines_own_conditioning(family, bases, shard, tmp_path, ray_cluster):
    encode_worker._TEXT_ENCODERS.clear()
    out = str(tmp_path / "lat")
    cfg = EncodeConfig(input=shard, output=out, base=bases[family], resolution=RESOLUTION, batch_size=3)
    man = run_encode(cfg)
    assert man["totals"] == {"seen": 4, "written": 4, "skipped": {}}
    entry = man["base"]
    assert entry["family"] == family and entry["identity"]["family"] == family
    pipe = _diffusers_pipeline(bases[family])
    assert entry["pipeline"] == type(pipe).__name__
    comps = entry["identity"]["components"]
    denoiser = "transformer" if family in ("pixart", "sd3") else "unet"
    assert set(comps) >= {"vae", denoiser, "text_encoder", "tokenizer", "scheduler"}
    first = {"pixart": "T5EncoderModel", "sd3": "CLIPTextModelWithProjection"}.get(family, "CLIPTextModel")
    assert comps["text_encoder"]["class"] == first
    assert comps["tokenizer"]["weights_sha256"] is None and len(comps[denoiser]["weights_sha256"]) == 64
    assert all(len(c["config_sha256"]) == 64 for c in comps.values())
    assert man["scale"] == pipe.vae.config.scaling_factor
    assert man["captions"]["truncated"] == {"base": 0 if family == "pixart" else 1}
    assert man["shift"] == (pipe.vae.config.shift_factor or 0.0)
    pooled, masked = family in ("sdxl", "sd3"), family == "pixart"
    assert entry["fields"] == {
        "prompt_embeds": "prompt_embeds.npy",
        "pooled_prompt_embeds": "pooled_prompt_embeds.npy" if pooled else None,
        "prompt_attention_mask": "prompt_attention_mask.npy" if masked else None,
    }
    assert entry["max_sequence_length"] == (300 if masked else None)

    with open(os.path.join(out, "s.tar"), "rb") as f:
        samples = {s.key: s.fields for s in iter_samples(f)}
    assert set(samples) == set(SIZES)
    worst, images = 0.0, _images()
    for key, fields in samples.items():
        ref = _reference(pipe, family, CAPTIONS[key])
        got = _npy(fields["prompt_embeds.npy"])
        if masked:  # stripped to the real tokens: the mask rebuilt to 300 is the pipeline's
            mask = _npy(fields["prompt_attention_mask.npy"])
            assert mask.dtype == np.uint8 and mask.shape == (got.shape[0],)
            rebuilt = np.zeros(entry["max_sequence_length"], np.uint8)
            rebuilt[: len(mask)] = mask
            np.testing.assert_array_equal(rebuilt, ref["mask"])
            assert 1 <= mask.sum() < 300 and meta_tokens(fields) == mask.sum()
            ref["embeds"] = ref["embeds"][: len(mask)]
        else:
            # padded, as the denoiser reads it; SD3: 77 CLIP rows zero-padded to T5's width, then 256 T5 rows
            assert got.shape == {"sd": (77, 32), "sdxl": (77, 80), "sd3": (77 + 256, 96)}[family]
        assert got.dtype == np.float16 and got.shape == ref["embeds"].shape
        np.testing.assert_allclose(got.astype(np.float32), ref["embeds"], **FP16)
        worst = max(worst, float(np.abs(got.astype(np.float32) - ref["embeds"]).max()))
        if pooled:
            p = _npy(fields["pooled_prompt_embeds.npy"])
            assert p.dtype == np.float16 and p.shape == ((16 + 24,) if family == "sd3" else (24,))
            np.testing.assert_allclose(p.astype(np.float32), ref["pooled"], **FP16)
        else:
            assert "pooled_prompt_embeds.npy" not in fields
        meta = json.loads(fields["json"])
        assert meta["text"]["base"]["truncated"] == (key == "long" and not masked)  # T5: 300 tokens
        # the latent is the raw posterior mean of the base's own VAE on the crop
        crop = imaging.resize_center_crop(Image.open(io.BytesIO(images[key])).convert("RGB"), RESOLUTION)[0]
        with torch.no_grad():
            want = pipe.vae.encode(torch.from_numpy(imaging.to_tensor_array(crop)[None])).latent_dist.mean[0].numpy()
        np.testing.assert_allclose(_npy(fields["latent.npy"]).astype(np.float32), want, atol=2e-2)
    print(f"{family}: max |stored - encode_prompt| = {worst:.2e}")

    # the empty caption as the pipeline embeds it for guidance (SDXL: zeros)
    ref = _reference(pipe, family, "a cat")
    empty = entry["empty_caption"]
    stored = _npy(storage.read_bytes(os.path.join(out, empty["prompt_embeds.npy"])))
    if masked:
        stored_mask = _npy(storage.read_bytes(os.path.join(out, empty["prompt_attention_mask.npy"])))
        assert stored_mask.sum() == ref["negative_mask"].sum() == len(stored_mask) == 1  # "" is "</s>"
        ref["negative"] = ref["negative"][: len(stored_mask)]
    np.testing.assert_allclose(stored.astype(np.float32), ref["negative"], **FP16)
    if pooled:
        stored_pooled = _npy(storage.read_bytes(os.path.join(out, empty["pooled_prompt_embeds.npy"])))
        np.testing.assert_allclose(stored_pooled.astype(np.float32), ref["negative_pooled"], **FP16)
    if family == "sdxl":  # force_zeros_for_empty_prompt
        assert empty["zeros"] and not stored.any() and not stored_pooled.any()
    else:
        assert not empty["zeros"] and stored.any()  # the encoded "" (not zeros)

    # a re-run resumes; the driver never held a text encoder
    assert run_encode(cfg)["shards"] == man["shards"]
    assert encode_worker._TEXT_ENCODERS == {}


def test_sdxl_time_ids_are_the_pipelines_add_time_ids(bases):
    # a 96 x 64 photo at 32: resized to 48 x 32, centre-cropped 8 px from the left
    meta = {"original_size": [96, 64], "crop_box": [16, 0, 80, 64], "resolution": 32}
    assert base_model.sdxl_time_ids(meta) == (64, 96, 0, 8, 32, 32)
    pipe = _diffusers_pipeline(bases["sdxl"])
    ids = pipe._get_add_time_ids((64, 96), (0, 8), (32, 32), torch.float32, text_encoder_projection_dim=24)
    assert ids[0].tolist() == list(base_model.sdxl_time_ids(meta))
    bucketed = {"original_size": [40, 72], "crop_box": [0, 6, 40, 66], "resolution": 32, "bucket": [32, 48]}
    assert base_model.sdxl_time_ids(bucketed) == (72, 40, 5, 0, 48, 32)


def _run_cli(capsys, shard: str, base: str, out: str) -> tuple[int, str]:
    rc = cli.main(["encode", "--input", shard, "--output", out, "--base", base, "--resolution", str(RESOLUTION)])
    return rc, capsys.readouterr().err


def test_hostile_base_folders_are_refused_in_one_line(bases, shard, tmp_path, capsys):
    def copy(name: str) -> str:
        dest = str(tmp_path / name)
        shutil.copytree(bases["sd"], dest)
        return dest

    def edit_index(path: str, **changes) -> None:
        index = json.loads(open(os.path.join(path, "model_index.json")).read())
        index.update(changes)
        for k in [k for k, v in changes.items() if v is None]:
            index.pop(k)
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump(index, f)

    cases = []
    pickled = str(tmp_path / "pickled")
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(bases["sd"]).save_pretrained(pickled, safe_serialization=False)
    cases.append((pickled, "only pickle weights"))
    custom = copy("custom")
    edit_index(custom, custom_pipeline="my/pipeline")
    cases.append((custom, "asks for custom code (custom_pipeline)"))
    unknown = copy("unknown")
    edit_index(unknown, _class_name="KandinskyPipeline")
    cases.append((unknown, "'KandinskyPipeline' pipeline"))
    strange = copy("strange")
    edit_index(strange, unet=["my_module", "MyUNet"])
    cases.append((strange, "component 'unet' is my_module.MyUNet"))
    linked = copy("linked")
    outside = str(tmp_path / "outside_text_encoder")
    shutil.move(os.path.join(linked, "text_encoder"), outside)
    os.symlink(outside, os.path.join(linked, "text_encoder"))
    cases.append((linked, "text_encoder/ is a link to a folder outside"))
    missing = copy("missing")
    shutil.rmtree(os.path.join(missing, "text_encoder"))
    cases.append((missing, "without its text_encoder component"))
    unlisted = copy("unlisted")
    edit_index(unlisted, tokenizer=None)
    cases.append((unlisted, "without its tokenizer component"))
    capsys.readouterr()  # the library's progress bars while the folders were built
    for base, words in cases:
        out = str(tmp_path / f"out_{os.path.basename(base)}")
        rc, err = _run_cli(capsys, shard, base, out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and words in err and "Traceback" not in err, (base, err)
        assert len(lines) == 1 and os.path.basename(base) in lines[0], err
        assert not os.path.exists(os.path.join(out, "s.tar"))


def test_base_is_exclusive_with_vae_and_text_encoder(bases, shard, tmp_path, capsys):
    for extra, words in (
        (["--vae", bases["sd"]], "'base' cannot be combined with 'vae'"),
        (["--text-encoder", bases["sd"] + "/text_encoder"], "'base' cannot be combined with 'text-encoder'"),
        (["--text-hidden-layer", "-2"], "'text-hidden-layer' cannot be combined with 'base'"),
    ):
        argv = ["encode", "--input", shard, "--output", str(tmp_path / "o"), "--base", bases["sd"], *extra]
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, err
