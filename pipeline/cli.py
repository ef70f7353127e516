"""The ``latent-pipeline`` console script: one verb per stage, each ``--config FILE.yaml`` + flags.

Each verb's options are the fields of its typed config dataclass; a YAML file may hold them at
the top level or under a section named after the verb (``encode:``), and flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import config as cfgmod
from .config import ConfigError


@dataclass
class Verb:
    name: str
    help: str
    config_cls: Callable[[], type]
    run: Callable[[Any], Any]
    positional: tuple[str, ...] = ()


def _shards_cls():
    from .shards import ShardsConfig
    return ShardsConfig


def _run_shards(cfg):
    from .shards import run_shards
    return run_shards(cfg)


def _encode_cls():
    from .encode import EncodeConfig
    return EncodeConfig


def _run_encode(cfg):
    from .encode import run_encode
    return run_encode(cfg)


def _demo_cls():
    from .demo import DemoConfig
    return DemoConfig


def _run_demo(cfg):
    from .demo import run_demo
    return run_demo(cfg)


def _train_cls():
    from .train_diffusion import TrainConfig
    return TrainConfig


def _run_train(cfg):
    from .train_diffusion import run_train
    return run_train(cfg)


def _sample_cls():
    from .sampling import SampleConfig
    return SampleConfig


def _run_sample(cfg):
    from .sampling import run_sample
    return run_sample(cfg)


def _train_vae_cls():
    from .train_vae import VAETrainConfig
    return VAETrainConfig


def _run_train_vae(cfg):
    from .train_vae import run_train_vae
    return run_train_vae(cfg)


def _restore_cls():
    from .restore_job import RestoreConfig
    return RestoreConfig


def _run_restore(cfg):
    from .restore_job import run_restore
    return run_restore(cfg)


def _eval_cls():
    from .evaluate import EvalConfig
    return EvalConfig


def _run_eval(cfg):
    from .evaluate import evaluate
    return evaluate(cfg)


VERBS = [
    Verb("demo", "run the whole workflow on local Ray, local folders and bundled sample photos",
         _demo_cls, _run_demo),
    Verb("shards", "pack a folder of images into WebDataset image shards", _shards_cls, _run_shards,
         positional=("src", "out")),
    Verb("train-vae", "train the built-in KL autoencoder on image shards with Ray Train",
         _train_vae_cls, _run_train_vae),
    Verb("encode", "encode image shards into latent shards with Ray tasks", _encode_cls, _run_encode),
    Verb("train", "train a latent diffusion model on cached latents with Ray Train", _train_cls, _run_train),
    Verb("sample", "draw samples from a diffusion checkpoint into a PNG grid", _sample_cls, _run_sample),
    Verb("restore", "restore / upscale images in bulk with Ray Data actors", _restore_cls, _run_restore),
    Verb("eval", "score a restoration checkpoint against bicubic, Lanczos and the autoencoder",
         _eval_cls, _run_eval),
]


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect

    so = json.loads(args.storage_options) if args.storage_options else None
    print(json.dumps(inspect(args.url, so), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        p.add_argument("--config", help="YAML file of options (flags override it)")
        cfgmod.add_arguments(p, verb.config_cls(), positional=verb.positional)
        p.set_defaults(_verb=verb)
    p = sub.add_parser("inspect", help="summarise a latent dataset, image shards or a checkpoint")
    p.add_argument("url")
    p.add_argument("--storage-options", default="", help="JSON of fsspec storage options")
    p.set_defaults(_inspect=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "_inspect", False):
            return _inspect(args)
        verb: Verb = args._verb
        cfg = cfgmod.from_args(verb.config_cls(), args, section=verb.name.replace("-", "_"))
        verb.run(cfg)
        return 0
    except (ConfigError, FileNotFoundError) as exc:
        print(f"latent-pipeline {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-pipeline {args.verb}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
