"""Hostile model folders (issue 22): every file a loader reads lies inside the folder given, the
identity covers exactly the files loaded, damaged weights and remote code are refused in one
line, and a tokenizer that gives the empty caption no tokens is handled (tiny real models built
offline; real Ray for the encode job)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import encode_image, photo_crops, tiny_diffusion_checkpoint, write_tar
from pipeline import cli
from pipeline.io import checkpoint, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.models import autoencoder, denoiser, loading, text

CORPUS = ["a photo of a cat", "a dog on a sofa", "a red train"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    return {
        "clip": text.build_stand_in(str(root / "clip"), CORPUS, kind="clip", seed=1),
        "clip_other": text.build_stand_in(str(root / "clip_other"), CORPUS, kind="clip", seed=7),
        "t5": text.build_stand_in(str(root / "t5"), CORPUS, kind="t5", seed=2),
    }


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "tiny")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=3)[0], path)
    return path


def _copy_without_weights(src: str, dst) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), dst)
    return str(dst)


def _shard(src: str, dst, base: str = "model") -> str:
    """A copy of ``src`` with its weights as an index and two shards (the libraries' layout)."""
    dst = _copy_without_weights(src, dst)
    state = load_file(os.path.join(src, f"{base}.safetensors"))
    keys = sorted(state)
    halves = {f"{base}-00001-of-00002.safetensors": keys[::2], f"{base}-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for shard, names in halves.items():
        save_file({k: state[k].contiguous() for k in names}, os.path.join(dst, shard))
        weight_map.update(dict.fromkeys(names, shard))
    with open(os.path.join(dst, f"{base}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                   "weight_map": weight_map}, f)  # fmt: skip
    return dst


def _encode_argv(tmp_path, vae_path: str, encoder: str) -> list[str]:
    shard = tmp_path / "in.tar"
    if not shard.exists():
        crops = photo_crops(2, size=64, seed=4)
        write_tar(str(shard), [m for i, c in enumerate(crops) for m in ((f"k{i}.png", encode_image(c)),
                                                                      (f"k{i}.txt", CORPUS[i].encode()))])  # fmt: skip
    out = tmp_path / f"out_{os.path.basename(encoder)}"
    return ["encode", "--input", str(shard), "--output", str(out), "--vae", vae_path, "--resolution", "64",
            "--text-encoder", encoder]  # fmt: skip


def _one_line_exit_2(capsys, argv: list[str], *words: str) -> str:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln and "INFO" not in ln]
    assert rc == 2, err
    assert "Traceback" not in err and "RayTaskError" not in err and "SafetensorError" not in err, err
    assert any(all(w in ln for w in words) for ln in lines), err
    return err


# --------------------------------------------------------------------------- 1. containment + identity


def _outside_attack(tmp_path, encoders) -> tuple[str, str]:
    """The issue's attack: an index mapping every tensor to ../../outside/model.safetensors (other
    weights), and a small decoy .safetensors beside it."""
    folder = _copy_without_weights(encoders["clip"], tmp_path / "models" / "clip")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(encoders["clip_other"], "model.safetensors"), outside / "model.safetensors")
    state = load_file(str(outside / "model.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": dict.fromkeys(state, "../../outside/model.safetensors")}, f)
    save_file({"decoy": torch.zeros(4)}, os.path.join(folder, "decoy.safetensors"))
    return folder, str(outside / "model.safetensors")


def test_an_index_naming_weights_outside_the_folder_is_refused_in_one_line(
    tmp_path, encoders, vae_path, ray_cluster, capsys
):
    folder, _outside = _outside_attack(tmp_path, encoders)
    with pytest.raises(CheckpointError, match=r"clip: model.safetensors.index.json names '../../outside/model") as e:
        text.TextEncoder(folder)
    assert "\n" not in str(e.value)
    # the whole verb: refused inside the describe_text_encoders Ray task, one line, exit 2
    _one_line_exit_2(capsys, _encode_argv(tmp_path, vae_path, folder), "models/clip", "model.safetensors.index.json")
    # an absolute name in the index too
    index = os.path.join(folder, "model.safetensors.index.json")
    data = json.loads(open(index).read())
    data["weight_map"] = dict.fromkeys(data["weight_map"], _outside)
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError, match=r"which is not a file inside the folder"):
        text.TextEncoder(folder)


def test_symlinks_leaving_the_folder_are_refused_for_every_kind_of_folder(tmp_path, encoders, vae_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    # a text encoder whose (sharded) weights include a link to a file outside
    sharded = _shard(encoders["clip"], tmp_path / "sharded")
    shard = os.path.join(sharded, "model-00002-of-00002.safetensors")
    shutil.move(shard, outside / "stolen.safetensors")
    os.symlink(outside / "stolen.safetensors", shard)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors \(named by model.safetensors.index"):
        text.TextEncoder(sharded)
    # a single weights file that is such a link; a tokenizer file that is one
    single = _copy_without_weights(encoders["clip"], tmp_path / "single")
    shutil.copy(os.path.join(encoders["clip_other"], "model.safetensors"), outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", os.path.join(single, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"single: model.safetensors is a link to a file outside the folder"):
        text.TextEncoder(single)
    tok = tmp_path / "tok"
    shutil.copytree(encoders["clip"], tok)
    shutil.move(tok / "tokenizer.json", outside / "tokenizer.json")
    os.symlink(outside / "tokenizer.json", tok / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer.json is a link to a file outside"):
        text.TextEncoder(str(tok))
    # a link inside the folder is fine
    inner = tmp_path / "inner"
    shutil.copytree(encoders["clip"], inner)
    os.rename(inner / "model.safetensors", inner / "weights.bin.safetensors")
    os.symlink("weights.bin.safetensors", inner / "model.safetensors")
    assert text.TextEncoder(str(inner)).identity == text.TextEncoder(encoders["clip"]).identity

    # a diffusion checkpoint whose vae/ or ema weights lie outside it; a network file that is a link
    ck = tiny_diffusion_checkpoint(str(tmp_path / "ck"))
    assert loading.describe(ck).kind == "diffusion"
    shutil.move(os.path.join(ck, checkpoint.VAE_DIR), outside / "vae")
    os.symlink(outside / "vae", os.path.join(ck, checkpoint.VAE_DIR))
    for call in (loading.describe, loading.load):
        with pytest.raises(CheckpointError, match=r"vae/ is a link to a folder outside it"):
            call(ck)
    ck2 = tiny_diffusion_checkpoint(str(tmp_path / "ck2"))
    shutil.move(os.path.join(ck2, "ema.safetensors"), outside / "ema.safetensors")
    os.symlink(outside / "ema.safetensors", os.path.join(ck2, "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"ema.safetensors is a link to a file outside"):
        loading.load(ck2)
    vae2 = tmp_path / "vae2"
    shutil.copytree(vae_path, vae2)
    shutil.move(vae2 / "ema.safetensors", outside / "vae_ema.safetensors")
    os.symlink(outside / "vae_ema.safetensors", vae2 / "ema.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors is a link to a file outside"):
        autoencoder.load(str(vae2))

    from spandrel.architectures.Compact import Compact

    from pipeline.restoration import networks

    net = Compact(num_feat=8, num_conv=2, upscale=2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(outside / "x2.safetensors"))
    (tmp_path / "nets").mkdir()
    os.symlink(outside / "x2.safetensors", tmp_path / "nets" / "x2.safetensors")
    with pytest.raises(CheckpointError, match=r"x2.safetensors is a link to a file outside the folder"):
        networks.describe(str(tmp_path / "nets" / "x2.safetensors"), "")


def _diffusers_vae(path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8)  # fmt: skip
    vae.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_a_sharded_folder_inside_loads_and_each_shard_is_in_the_identity(tmp_path, encoders):
    plain = text.TextEncoder(encoders["clip"])
    sharded = _shard(encoders["clip"], tmp_path / "sharded")
    save_file({"decoy": torch.zeros(4)}, os.path.join(sharded, "decoy.safetensors"))  # not loaded: not hashed
    te = text.TextEncoder(sharded)
    caption = ["a photo of a cat"]
    assert np.array_equal(te.encode(caption)[0].hidden, plain.encode(caption)[0].hidden)  # the same weights
    ident = te.identity
    assert ident["tokenizer_sha256"] == plain.identity["tokenizer_sha256"]
    save_file({"decoy": torch.ones(4)}, os.path.join(sharded, "decoy.safetensors"))
    assert text.TextEncoder(sharded).identity == ident  # the decoy is no part of what loads
    # change one shard: the embeddings change, and so does the identity
    path = os.path.join(sharded, "model-00002-of-00002.safetensors")
    state = load_file(path)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, path)
    changed = text.TextEncoder(sharded)
    assert not np.array_equal(changed.encode(caption)[0].hidden, te.encode(caption)[0].hidden)
    assert changed.identity["weights_sha256"] != ident["weights_sha256"]
    spec = text.TextSpec([{"name": "clip", "width": 32, "pooled_width": 32, "identity": ident, "source": sharded}])
    with pytest.raises(CheckpointError, match=r"not the one the model was trained with \(clip: weights_sha256 differ"):
        text.load_recorded(spec, [sharded])
    # the config is part of the identity too
    cfg_path = os.path.join(sharded, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["layer_norm_eps"] = 1e-3
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert text.TextEncoder(sharded).identity["config_sha256"] != changed.identity["config_sha256"]

    # a diffusers VAE the same way: sharded inside loads as the single file does; one shard changes the identity
    single = _diffusers_vae(tmp_path / "vae")
    vae_sharded = _shard(single, tmp_path / "vae_sharded", "diffusion_pytorch_model")
    a, b = autoencoder.load(single), autoencoder.load(vae_sharded)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(x).mean, b.encode(x).mean)
    assert a.weights_sha256 == storage.sha256_file(os.path.join(single, "diffusion_pytorch_model.safetensors"))
    shard = os.path.join(vae_sharded, "diffusion_pytorch_model-00001-of-00002.safetensors")
    state = load_file(shard)
    save_file({k: v * 1.01 for k, v in state.items()}, shard)
    assert autoencoder.load(vae_sharded).weights_sha256 != b.weights_sha256
    # and an index naming a file outside, beside a decoy single file: refused, never loaded
    index = os.path.join(vae_sharded, "diffusion_pytorch_model.safetensors.index.json")
    data = json.loads(open(index).read())
    data["weight_map"] = dict.fromkeys(data["weight_map"], "../vae/diffusion_pytorch_model.safetensors")
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError, match=r"index.json names '../vae/diffusion_pytorch_model.safetensors'"):
        autoencoder.load(vae_sharded)
    shutil.copy(os.path.join(single, "diffusion_pytorch_model.safetensors"), vae_sharded)
    with pytest.raises(CheckpointError, match=r"both diffusion_pytorch_model.safetensors and .*ambiguous"):
        autoencoder.load(vae_sharded)


def test_a_pipeline_component_whose_weights_lie_outside_is_refused_on_the_driver(tmp_path):
    from test_pipelines import _ldm, _save

    from pipeline.restoration import pipeline_folders

    folder = _save(_ldm(0), tmp_path / "ldm")
    assert pipeline_folders.describe(folder, "") == "upscale4"
    outside = tmp_path / "outside"
    outside.mkdir()
    unet = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    shutil.move(unet, outside / "unet.safetensors")
    os.symlink(outside / "unet.safetensors", unet)
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model.safetensors is a link to a file outside"):
        pipeline_folders.describe(folder, "")
    os.remove(unet)
    shutil.copy(outside / "unet.safetensors", unet)
    with open(unet, "r+b") as f:  # damaged: cut short
        f.truncate(os.path.getsize(unet) // 2)
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model.safetensors is not a readable"):
        pipeline_folders.describe(folder, "")


# --------------------------------------------------------------------------- 2. damaged weights


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    if how == "truncated":
        data = data[: 8 + n + (len(data) - 8 - n) // 2]
    elif how == "huge tensor":
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [1 << 20, 1 << 20]
        header[name]["data_offsets"] = [0, 1 << 42]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    else:  # a 2**62 header length
        data = struct.pack("<Q", 1 << 62) + data[8:]
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["truncated", "huge tensor", "header length 2**62"])
def test_damaged_weights_are_named_in_one_line(tmp_path, encoders, how):
    folder = tmp_path / "clip"
    shutil.copytree(encoders["clip"], folder)
    _damage(str(folder / "model.safetensors"), how)
    with pytest.raises(CheckpointError, match=r"clip: model.safetensors is not a readable safetensors file") as e:
        text.TextEncoder(str(folder))
    assert "\n" not in str(e.value)
    vae = _diffusers_vae(tmp_path / "vae")
    _damage(os.path.join(vae, "diffusion_pytorch_model.safetensors"), how)
    with pytest.raises(CheckpointError, match=r"vae: diffusion_pytorch_model.safetensors is not a readable"):
        autoencoder.load(vae)


def test_a_damaged_text_encoder_ends_the_encode_verb_in_one_line(tmp_path, encoders, vae_path, ray_cluster, capsys):
    folder = tmp_path / "clip"
    shutil.copytree(encoders["clip"], folder)
    _damage(str(folder / "model.safetensors"), "header length 2**62")
    _one_line_exit_2(capsys, _encode_argv(tmp_path, vae_path, str(folder)), "model.safetensors", "not a readable")


# --------------------------------------------------------------------------- 3. zero-token captions


def _without_special_tokens(src: str, dst) -> str:
    """A copy of ``src`` whose tokenizer adds no start or end token (its post-processor removed)."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return str(dst)


def test_a_zero_token_empty_caption_is_an_empty_embedding_in_training_and_sampling(
    tmp_path, encoders, vae_path, ray_cluster, capsys
):
    folder = _without_special_tokens(encoders["t5"], tmp_path / "t5_bare")
    te = text.TextEncoder(folder)
    assert te.tokenizer([""])["input_ids"] == [[]]  # the case itself
    empty = te.encode([""])[0]
    assert empty.hidden.shape == (0, te.width) and empty.pooled is None and not empty.truncated
    alone = te.encode(["a red train"])[0].hidden
    mixed = te.encode(["", "a red train", ""])
    assert [m.hidden.shape[0] for m in mixed] == [0, alone.shape[0], 0]
    assert np.array_equal(mixed[1].hidden, alone)  # an empty caption in the batch changes nothing
    # sampling: the conditioning built as training reads it; the empty row is no text at all
    spec = text.TextSpec([{"name": "t5", "width": te.width, "pooled_width": 0, "identity": te.identity,
                           "source": folder}])  # fmt: skip
    kw = text.condition([te], spec, ["", "a red train"])
    assert kw["text"].shape == (2, alone.shape[0], te.width) and not kw["text_mask"][0].any()
    only = text.condition([te], spec, [""])
    assert only["text"].shape == (1, 0, te.width) and only["text_mask"].shape == (1, 0)
    torch.manual_seed(0)
    net = denoiser.build(denoiser.config_for("dit-tiny", text_dim=te.width)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
        v_batch = net(x.expand(2, -1, -1, -1), t.expand(2), **kw)
        v_only = net(x, t, **only)
    assert torch.isfinite(v_batch).all() and torch.allclose(v_batch[:1], v_only, atol=1e-5)
    # the encode verb: its empty caption stored with 0 tokens
    argv = _encode_argv(tmp_path, vae_path, folder)
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = argv[argv.index("--output") + 1]
    man = json.loads(open(os.path.join(out, "_manifest.json")).read())
    stored = np.load(os.path.join(out, "_empty_caption", "text_t5.npy"), allow_pickle=False)
    assert stored.shape == (0, te.width)
    assert man["text_encoders"][0]["empty_caption"]["tokens"] == 0


def test_an_encoder_with_a_pooled_embedding_and_no_tokens_for_the_empty_caption_is_refused(tmp_path, encoders):
    folder = _without_special_tokens(encoders["clip"], tmp_path / "clip_bare")
    with pytest.raises(
        CheckpointError, match=r"clip_bare: its tokenizer gives the empty caption no tokens.*pooled"
    ) as e:
        text.TextEncoder(folder)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- 4. remote code


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_before_transformers_is_asked(tmp_path, encoders, capfd, where):
    folder = tmp_path / "custom"
    shutil.copytree(encoders["clip"], folder)
    cfg = json.loads((folder / where).read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
                       "AutoTokenizer": ["tokenization_x.XTokenizer", None]}  # fmt: skip
    (folder / where).write_text(json.dumps(cfg))
    (folder / "modeling_x.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(CheckpointError, match=rf"custom: {where} asks for custom code \(auto_map\)"):
        text.TextEncoder(str(folder))
    out, err = capfd.readouterr()
    assert "custom code" not in out + err and "[y/N]" not in out + err, out + err


def test_a_hugging_face_cache_snapshot_loads_and_links_beyond_its_own_blobs_are_refused(tmp_path):
    """The hub's cache keeps a snapshot's files as links into its repository's ``blobs/``: such a
    folder loads as the library loads it; a link into another repository's blobs does not."""
    import hashlib

    made = _diffusers_vae(tmp_path / "made")
    repo = tmp_path / "hub" / "models--org--vae"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in os.listdir(made):
        data = open(os.path.join(made, name), "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    loaded, plain = autoencoder.load(str(snap)), autoencoder.load(made)
    assert loaded.weights_sha256 == plain.weights_sha256
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x).mean, plain.encode(x).mean)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    weights = snap / "diffusion_pytorch_model.safetensors"
    (other / "w").write_bytes(weights.read_bytes())
    weights.unlink()
    os.symlink(os.path.relpath(other / "w", snap), weights)
    with pytest.raises(CheckpointError, match="is a link to a file outside the folder"):
        autoencoder.load(str(snap))
