"""Benchmark training: cached latents vs the encoder in the loop, data-wait share, 1 vs 2 workers.

In one run on the same machine and the same tiny denoiser:
(a) single process, batches streamed from cached latent shards (what `train` does);
(b) single process, batches streamed from the raw image shards, decoded and encoded by the
    autoencoder inside every step (what training without latent caching costs);
(a) and (b) are measured for each autoencoder preset (the encoder's cost decides the gain);
(c) the Ray Train job (`run_train`) with 1 and with 2 workers, reading samples/s and the
    data-wait share from its metrics.jsonl.
Part ``t2i`` (text-to-image on captioned photo crops, a tiny stand-in text encoder):
(d) the Ray Train job (2 workers, dit-tiny) on aspect-ratio buckets (80x48, 64x64, 48x80) vs
    square-only (64x64) latents at about the same latent tokens per batch: tokens/s ratio
    (target >= 0.9x) and data-wait shares (target < 2 %);
(e) a transformer vs a U-Net of similar parameter count (the U-Net ``tiny`` with text
    cross-attention vs a DiT of hidden 96, depth 4), one process, the same wall-clock budget:
    step time and the flow-matching loss on fixed held-out batches (same t and noise) after it.
Part ``finetune`` (``finetune``'s step on a small SDXL-architecture UNet, random weights):
(f) full fine-tune vs LoRA (rank 8 on the attention projections), each with and without
    gradient checkpointing, one process each (a fresh spawned process, so the peak RSS is its
    own): median step time and the peak resident memory the step adds over the built model
    (weights, gradients, AdamW state, activations), split into the activations autograd keeps for
    backward, the gradients + AdamW moments of what trains, and the rest (what glibc malloc keeps
    of freed temporaries); ratios against the full fine-tune;
    ``--ft-rounds`` interleaved rounds (each runs every variant once, in a rotated order), medians.
Part ``finetune-naive`` (the same UNet inside the tests' tiny SDXL pipeline, a cache of 32
128-px images written as `encode --base` writes it):
(g) ``finetune`` (LoRA rank 8, one Ray Train worker holding every core) vs a single-process loop
    written the way diffusers' ``train_text_to_image_lora_sdxl.py`` example writes it (the same
    cached inputs in memory, batch 4, fp32): samples/s ratio, target >= 1.0, interleaved rounds.
Prints samples/s, the ratio (a)/(b) and the data-wait shares as JSON.
Usage: python bench/train.py [--parts cache,t2i,finetune,finetune-naive --images 384 --resolution 128
       --steps 60 --ft-steps 5 --ft-rounds 2 --ft-naive-steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import write_photo_folder
from pipeline.io import imaging, storage
from pipeline.models import autoencoder, denoiser, flow
from pipeline.ray_setup import ensure_ray
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.shards import ShardsConfig, run_shards
from pipeline.stages.train import TrainConfig, run_train
from pipeline.train.streams import BatchStream, latent_stream


def timed_loop(stream, step_fn, steps: int) -> dict:
    """samples/s and data-wait share over ``steps`` steps (after 3 warm-up steps)."""
    it = iter(stream)
    for _ in range(3):
        step_fn(next(it))
    wait = 0.0
    n = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - tw
        n += step_fn(batch)
    total = time.perf_counter() - t0
    stream.close()
    return {"samples_per_s": round(n / total, 2), "data_wait_share": round(wait / total, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--presets", default="tiny,small", help="autoencoder presets to compare")
    ap.add_argument("--parts", default="cache,t2i")
    ap.add_argument("--t2i-steps", type=int, default=150)
    ap.add_argument("--wall-seconds", type=float, default=90.0, help="(e): training time per model")
    ap.add_argument("--ft-steps", type=int, default=5, help="(f): timed steps per variant and round")
    ap.add_argument("--ft-rounds", type=int, default=2, help="(f), (g): interleaved rounds")
    ap.add_argument("--ft-naive-steps", type=int, default=20, help="(g): timed steps per run")
    ap.add_argument("--json", default="bench/results/train.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    parts = set(args.parts.split(","))
    result: dict = {"cpus": os.cpu_count()}
    if "t2i" in parts:
        result["t2i"] = text_to_image(args)
        print(json.dumps(result["t2i"], indent=2), flush=True)
    if "cache" in parts:
        result.update(cache(args))
    if "finetune" in parts:
        result["finetune"] = finetune_parts(args)
        print(json.dumps(result["finetune"], indent=2), flush=True)
    if "finetune-naive" in parts:
        result["finetune_naive"] = finetune_vs_naive(args)
        print(json.dumps(result["finetune_naive"], indent=2), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        storage.write_json(args.json, result)


def _sdxl_unet(text_width: int = 256, pooled_width: int = 128):
    """A small UNet of SDXL's architecture: DownBlock + two cross-attention levels with more
    transformer layers deeper, text_time added conditioning (pooled text + 6 time ids)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=pooled_width + 6 * 32,
        use_linear_projection=True,
        norm_num_groups=32,
    )


def _finetune_step_probe(lora: bool, checkpointing: bool, steps: int, batch: int, out) -> None:
    """In a fresh process: build, then time ``steps`` finetune steps; peak RSS over the build."""
    import resource

    from pipeline.models import objectives
    from pipeline.models.base import ATTENTION
    from pipeline.train.finetune import FinetuneConfig, add_lora

    torch.set_num_threads(os.cpu_count() or 1)
    unet = _sdxl_unet().train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    trained = (
        add_lora(
            unet, FinetuneConfig(latents="x", base="y", output="/tmp/x", lora_rank=8, lora_targets=ATTENTION).lora()
        )
        if lora
        else unet
    )
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    obj = objectives.from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"})
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(0)
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes of what autograd keeps for the backward pass

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for i in range(steps + 1):
        x, n = torch.randn(batch, 4, 32, 32, generator=g), torch.randn(batch, 4, 32, 32, generator=g)
        t = objectives.sample_timesteps(obj, batch, g)
        cond = {
            "text_embeds": torch.randn(batch, 128),
            "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * batch),
        }
        t0 = time.perf_counter()
        # the untimed first step also counts the saved activations (the hook costs time)
        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t) if i == 0 else contextlib.nullcontext()
        with hooks:
            out_ = unet(
                objectives.noisy_latents(obj, x, n, t),
                t,
                encoder_hidden_states=torch.randn(batch, 77, 256),
                added_cond_kwargs=cond,
            ).sample
            loss = objectives.loss(obj, out_, x, n, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trained_params = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    out.put(
        {
            "trained_params": trained_params,
            "step_s": float(np.median(times[1:])),
            "peak_added_mb": (peak - built) / 1024,
            "saved_activations_mb": sum(saved.values()) / 2**20,
            "grads_adam_mb": 3 * 4 * trained_params / 2**20,  # fp32 gradient + AdamW's two moments
        }
    )


FT_VARIANTS = {  # name: (lora, gradient checkpointing)
    "full": (False, False),
    "full+checkpointing": (False, True),
    "lora": (True, False),
    "lora+checkpointing": (True, True),
}


def finetune_parts(args) -> dict:
    """(f) full vs LoRA, with and without gradient checkpointing, each in its own process,
    interleaved: ``--ft-rounds`` rounds, each running every variant once in a rotated order, so
    a slow spell of a shared machine hits every variant alike; medians over the rounds."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    names = list(FT_VARIANTS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.ft_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            q = ctx.Queue()
            p = ctx.Process(target=_finetune_step_probe, args=(*FT_VARIANTS[name], args.ft_steps, 4, q))
            p.start()
            runs[name].append(q.get())
            p.join()
    rows = {}
    for name, measured in runs.items():
        rows[name] = row = {
            "trained_params": measured[0]["trained_params"],
            "step_s": round(float(np.median([m["step_s"] for m in measured])), 3),
            "step_s_rounds": [round(m["step_s"], 3) for m in measured],
            "peak_added_mb": round(float(np.median([m["peak_added_mb"] for m in measured])), 1),
            "peak_added_mb_rounds": [round(m["peak_added_mb"], 1) for m in measured],
            "saved_activations_mb": round(measured[0]["saved_activations_mb"], 1),
            "grads_adam_mb": round(measured[0]["grads_adam_mb"], 1),
        }
        # what the peak holds beyond the live tensors: memory the allocator (glibc malloc) keeps
        # after freeing the step's temporaries, in holes between live activations
        row["allocator_kept_mb"] = round(row["peak_added_mb"] - row["saved_activations_mb"] - row["grads_adam_mb"], 1)
    full = rows["full"]
    for row in rows.values():
        row["step_time_vs_full"] = round(row["step_s"] / full["step_s"], 3)
        row["peak_memory_vs_full"] = round(row["peak_added_mb"] / max(full["peak_added_mb"], 1e-9), 3)
    out = {"unet": "SDXL architecture, 64/128/256 channels", "batch": 4, "latent": [4, 32, 32], **rows}
    out["lora_speedup_vs_full"] = round(full["step_s"] / rows["lora"]["step_s"], 3)
    out["targets"] = {"lora_speedup_vs_full_min": 1.5, "lora_peak_memory_vs_full_max": 0.6}
    return out


def _tiny_sdxl_base(root: str) -> str:
    """The tests' tiny SDXL pipeline (stand-in CLIP encoders, tiny VAE) with the bench's UNet,
    saved as a base folder."""
    from tiny_bases import WIDTH, save, sdxl_pipeline

    pipe = sdxl_pipeline(pathlib.Path(root), 0)
    pipe.unet = _sdxl_unet(text_width=2 * WIDTH, pooled_width=WIDTH)
    pipe.register_modules(unet=pipe.unet)
    return save(pipe, os.path.join(root, "base"))


def _load_cache(latents: str) -> list[dict[str, torch.Tensor]]:
    """Every cached sample in memory: what the diffusers example's dataset holds after its
    ``compute_vae_encodings``/``compute_embeddings`` pre-pass (latents scaled, embeddings)."""
    from pipeline.io import manifest, tarshards
    from pipeline.models.base_model import POOLED, PROMPT_EMBEDS, sdxl_time_ids

    man = manifest.load(latents)
    items = []
    for url in manifest.shard_urls(latents, man):
        with open(url, "rb") as f:
            fields = [s.fields for s in tarshards.iter_samples(f)]
        for s in fields:
            items.append(
                {
                    "model_input": torch.from_numpy(tarshards.load_npy(s["latent.npy"]).astype(np.float32))
                    * float(man["scale"]),
                    "prompt_embeds": torch.from_numpy(tarshards.load_npy(s[PROMPT_EMBEDS]).astype(np.float32)),
                    "pooled_prompt_embeds": torch.from_numpy(tarshards.load_npy(s[POOLED]).astype(np.float32)),
                    "time_ids": torch.tensor(sdxl_time_ids(json.loads(s["json"])), dtype=torch.float32),
                }
            )
    return items


WARMUP = 10  # (g): steps before timing (a Ray worker's first ~10 steps run slower: its start-up)


def naive_lora_loop(base: str, latents: str, batch: int, steps: int, rank: int = 8) -> float:
    """A single-process LoRA loop written the way diffusers' ``train_text_to_image_lora_sdxl.py``
    example writes it (precomputed latents and embeddings, DataLoader, DDPMScheduler.add_noise,
    MSE on epsilon, clip, AdamW step): samples/s over ``steps`` steps after ``WARMUP`` steps."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(os.cpu_count() or 1)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loader = torch.utils.data.DataLoader(
        _load_cache(latents),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
    )
    unet.train()
    done, t0 = 0, 0.0
    while done < steps + WARMUP:
        for b in loader:
            if done == WARMUP:
                t0 = time.perf_counter()
            model_input = b["model_input"]
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            cond = {"time_ids": b["time_ids"], "text_embeds": b["pooled_prompt_embeds"]}
            pred = unet(noisy, timesteps, b["prompt_embeds"], added_cond_kwargs=cond).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss.item()
            done += 1
            if done == steps + WARMUP:
                break
    return batch * steps / (time.perf_counter() - t0)


def _naive_in_ray_train(loop_config: dict) -> None:
    """:func:`naive_lora_loop` on a Ray Train worker (what Ray's placement alone costs)."""
    c = loop_config
    with open(c["result"], "w") as f:
        json.dump(naive_lora_loop(c["base"], c["latents"], c["batch"], c["steps"]), f)


def finetune_vs_naive(args) -> dict:
    """(g): `finetune` (LoRA rank 8, one Ray Train worker with every core) vs
    :func:`naive_lora_loop` on the same base, cache, batch and fp32, in interleaved rounds; the
    naive loop also runs on a Ray Train worker of the same size, which splits the gap into what
    Ray's worker costs and what `finetune`'s own loop costs."""
    from diffusers import StableDiffusionXLPipeline
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from tiny_bases import write_cache

    from pipeline.train.finetune import FinetuneConfig, run_finetune

    batch, steps = 4, args.ft_naive_steps
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as root:
        base = _tiny_sdxl_base(root)
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        latents = write_cache(pipe, base, os.path.join(root, "cache"), n=32, per_shard=8, size=128)
        ensure_ray(num_cpus=cpus)
        runs: dict[str, list[float]] = {"finetune": [], "naive": [], "naive_on_ray_worker": []}

        def measure(which: str, r: int) -> float:
            if which == "naive":
                return naive_lora_loop(base, latents, batch, steps)
            if which == "naive_on_ray_worker":
                result = os.path.join(root, "naive.json")
                config = {"base": base, "latents": latents, "batch": batch, "steps": steps, "result": result}
                scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus})
                TorchTrainer(_naive_in_ray_train, train_loop_config=config, scaling_config=scaling).fit()
                return float(json.load(open(result)))
            out = os.path.join(root, f"ft{r}")
            cfg = FinetuneConfig(
                latents=latents, base=base, output=out, workers=1, cpus_per_worker=cpus, lora_rank=8,
                steps=steps + WARMUP, batch_size=batch, log_every=5, checkpoint_every=steps + WARMUP, warmup_steps=0,
                shuffle_buffer=32, caption_dropout=0.0, max_failures=0,
            )  # fmt: skip
            run_finetune(cfg)
            rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][WARMUP // 5 :]
            return float(np.mean([row["samples_per_s"] for row in rows]))

        names = list(runs)
        for r in range(args.ft_rounds):
            for which in names[r % len(names) :] + names[: r % len(names)]:
                runs[which].append(measure(which, r))

    def ratio(a: str, b: str) -> float:
        return round(float(np.median([x / y for x, y in zip(runs[a], runs[b])])), 3)

    return {
        "lora_rank": 8,
        "batch": batch,
        "latent": [4, 32, 32],
        **{f"{k}_samples_per_s": [round(x, 2) for x in v] for k, v in runs.items()},
        "finetune_vs_naive": ratio("finetune", "naive"),
        "naive_on_ray_worker_vs_naive": ratio("naive_on_ray_worker", "naive"),
        "finetune_vs_naive_on_ray_worker": ratio("finetune", "naive_on_ray_worker"),
        "target_finetune_vs_naive": 1.0,
    }


def text_to_image(args) -> dict:
    """(d) and (e)."""
    from pipeline.io import sample_photos
    from pipeline.models import text

    with tempfile.TemporaryDirectory() as root:
        crops = os.path.join(root, "crops")
        sample_photos.write_captioned_crops(crops, [(96, 64), (64, 96), (80, 80)], per_photo=64)
        run_shards(ShardsConfig(src=crops, out=os.path.join(root, "shards"), samples_per_shard=64))
        te = text.build_stand_in(os.path.join(root, "te"), list(sample_photos.CAPTIONS.values()), width=64)
        vae_dir = os.path.join(root, "vae")
        autoencoder.save_kl(autoencoder.new_kl("tiny")[0], vae_dir)
        ensure_ray()
        shards = os.path.join(root, "shards", "*.tar")
        common = {"input": shards, "vae": vae_dir, "text_encoder": [te], "resolution": 64}
        lat = {
            "square": run_encode(EncodeConfig(output=os.path.join(root, "square"), **common)),
            "buckets": run_encode(
                EncodeConfig(
                    output=os.path.join(root, "buckets"), buckets="auto", bucket_multiple=16, max_aspect=2.0, **common
                )
            ),
        }
        mean_tokens = {
            "square": 16 * 16,
            "buckets": sum(
                b["samples"] * b["latent_shape"][1] * b["latent_shape"][2] for b in lat["buckets"]["buckets"]
            )
            / lat["buckets"]["totals"]["written"],
        }
        runs = {}
        for name in ("square", "buckets"):
            out = os.path.join(root, f"run-{name}")
            run_train(
                TrainConfig(
                    latents=os.path.join(root, name), output=out, model="dit-tiny", workers=2, steps=args.t2i_steps,
                    batch_size=16, log_every=10, checkpoint_every=args.t2i_steps, warmup_steps=5, sample_steps=2,
                )
            )  # fmt: skip
            rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][1:]
            sps = float(np.mean([r["samples_per_s"] for r in rows]))
            runs[name] = {
                "samples_per_s": round(sps, 1),
                "latent_tokens_per_sample": round(mean_tokens[name], 1),
                "latent_tokens_per_s": round(sps * mean_tokens[name], 0),
                "data_wait_share": round(float(np.mean([r["data_wait_share"] for r in rows])), 4),
            }
        out: dict = {
            "ray_train_2_workers": runs,
            "buckets_vs_square_tokens_per_s": round(
                runs["buckets"]["latent_tokens_per_s"] / runs["square"]["latent_tokens_per_s"], 3
            ),
        }
        out["same_budget"] = transformer_vs_unet(os.path.join(root, "buckets"), args.wall_seconds)
        out["targets"] = {"buckets_vs_square_tokens_per_s": 0.9, "data_wait_share_max": 0.02}
        return out


def transformer_vs_unet(latents: str, seconds: float) -> dict:
    """(e): train each model for ``seconds`` of wall time on the same stream; loss on fixed batches."""
    from pipeline.models.text import TextSpec

    man = json.loads(open(os.path.join(latents, "_manifest.json")).read())
    spec = TextSpec.from_manifest(man)
    kw = {"latent_channels": 4, "text_dim": spec.text_dim, "pooled_dim": spec.pooled_dim}
    models = {
        "unet_tiny": denoiser.config_for("tiny", **kw),
        "dit_h96_d4": denoiser.config_for("dit-tiny", hidden=96, depth=4, heads=4, **kw),
    }
    held = latent_stream(latents, batch_size=16, use_text=True, seed=99, shuffle_buffer=64)
    it = iter(held)
    val = [next(it) for _ in range(6)]
    held.close()
    gen = torch.Generator().manual_seed(0)
    fixed = [(flow.sample_t(b.x0.shape[0], "cpu", gen), torch.randn(b.x0.shape, generator=gen)) for b in val]
    out = {}
    for name, mcfg in models.items():
        torch.manual_seed(0)
        net = denoiser.build(mcfg)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        stream = latent_stream(latents, batch_size=16, use_text=True, caption_dropout=0.1, shuffle_buffer=256)
        it = iter(stream)
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b = next(it)
            bkw = b.model_kwargs("cpu")
            t = flow.sample_t(b.x0.shape[0], "cpu")
            loss = flow.loss(lambda x, tt: net(x, tt, **bkw), b.x0, t, torch.randn_like(b.x0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        elapsed = time.perf_counter() - t0
        stream.close()
        with torch.no_grad():
            losses = [
                flow.loss(lambda x, tt: net(x, tt, **b.model_kwargs("cpu")), b.x0, t, noise).item()
                for b, (t, noise) in zip(val, fixed)
            ]
        out[name] = {
            "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
            "steps": steps,
            "step_ms": round(1000 * elapsed / steps, 1),
            "held_out_loss": round(float(np.mean(losses)), 4),
        }
    return out


def cache(args) -> dict:
    """(a)-(c)."""
    with tempfile.TemporaryDirectory() as root:
        write_photo_folder(os.path.join(root, "photos"), n=args.images, size=args.resolution)
        run_shards(
            ShardsConfig(src=os.path.join(root, "photos"), out=os.path.join(root, "shards"), samples_per_shard=64),
        )
        ensure_ray()
        net = denoiser.build(denoiser.config_for("tiny", latent_channels=4))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(x0: torch.Tensor) -> int:
            t = flow.sample_t(x0.shape[0], "cpu")
            loss = flow.loss(lambda x, tt: net(x, tt), x0, t, torch.randn_like(x0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return x0.shape[0]

        def collate(items, _rng):
            ims = [
                imaging.resize_center_crop(imaging.to_rgb(imaging.decode(s.get("jpg") or s["png"])), args.resolution)[0]
                for s in items
            ]
            return torch.from_numpy(np.stack([imaging.to_tensor_array(im) for im in ims]))

        shards = storage.expand(os.path.join(root, "shards", "*.tar"))
        by_preset = {}
        for preset in args.presets.split(","):
            vae_dir, lat = os.path.join(root, f"vae-{preset}"), os.path.join(root, f"lat-{preset}")
            autoencoder.save_kl(autoencoder.new_kl(preset)[0], vae_dir)
            run_encode(
                EncodeConfig(
                    input=os.path.join(root, "shards", "*.tar"), output=lat, vae=vae_dir, resolution=args.resolution
                ),
            )
            vae = autoencoder.load(vae_dir)

            def uncached_step(pixels: torch.Tensor, vae=vae) -> int:
                with torch.no_grad():
                    z = autoencoder.scale_latents(vae.encode(pixels).mean, vae.scale, vae.shift)
                return step(z)

            cached = timed_loop(
                latent_stream(lat, batch_size=args.batch_size, shuffle_buffer=256), lambda b: step(b.x0), args.steps
            )
            uncached = timed_loop(
                BatchStream(shards, collate, batch_size=args.batch_size, shuffle_buffer=256), uncached_step, args.steps
            )
            by_preset[preset] = {
                "cached": cached,
                "uncached_encoder_in_loop": uncached,
                "cached_vs_uncached": round(cached["samples_per_s"] / uncached["samples_per_s"], 2),
            }

        ray_runs = {}
        for workers in (1, 2):
            out = os.path.join(root, f"ray{workers}")
            run_train(
                TrainConfig(
                    latents=os.path.join(root, "lat-tiny"),
                    output=out,
                    workers=workers,
                    cpus_per_worker=2 / workers,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    log_every=10,
                    checkpoint_every=args.steps,
                    warmup_steps=5,
                ),
            )
            rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][1:]  # skip warm-up window
            ray_runs[f"{workers}_workers"] = {
                "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in rows])), 2),
                "data_wait_share": round(float(np.mean([r["data_wait_share"] for r in rows])), 4),
            }

    return {
        "resolution": args.resolution,
        "denoiser": "tiny",
        "batch_size": args.batch_size,
        "autoencoders": by_preset,
        "ray_train": ray_runs,
        "two_vs_one_worker": round(ray_runs["2_workers"]["samples_per_s"] / ray_runs["1_workers"]["samples_per_s"], 2),
        "targets": {"cached_vs_uncached": 3.0, "data_wait_share_max": 0.05},
    }


if __name__ == "__main__":
    main()
