"""The ``latent-pipeline`` console script: one verb per stage, each ``--config FILE.yaml`` + flags.

Each verb's options are the fields of its typed config dataclass; a YAML file may hold them at
the top level or under a section named after the verb (``encode:``), and flags override it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from . import config as cfgmod
from .config import ConfigError


@dataclass
class Verb:
    """A verb: its config class and run function, as ``module:attribute`` (imported lazily)."""

    name: str
    help: str
    config: str
    run: str
    positional: tuple[str, ...] = ()

    def config_cls(self) -> type:
        return _load(self.config)

    def __call__(self, cfg: Any) -> Any:
        return _load(self.run)(cfg)


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(f"pipeline.{module}"), attr)


VERBS = [
    Verb("demo", "run the whole workflow on local Ray, local folders and bundled sample photos",
         "demo:DemoConfig", "demo:run_demo"),
    Verb("shards", "pack a folder of images into WebDataset image shards", "shards:ShardsConfig",
         "shards:run_shards", positional=("src", "out")),
    Verb("train-vae", "train the built-in KL autoencoder on image shards with Ray Train",
         "train_vae:VAETrainConfig", "train_vae:run_train_vae"),
    Verb("encode", "encode image shards into latent shards with Ray tasks", "encode:EncodeConfig",
         "encode:run_encode"),
    Verb("train", "train a latent diffusion model on cached latents with Ray Train", "train_diffusion:TrainConfig",
         "train_diffusion:run_train"),
    Verb("sample", "draw samples from a diffusion checkpoint into a PNG grid", "sampling:SampleConfig",
         "sampling:run_sample"),
    Verb("restore", "restore / upscale images in bulk with Ray Data actors", "restore_job:RestoreConfig",
         "restore_job:run_restore"),
    Verb("eval", "score a restoration checkpoint against bicubic, Lanczos and the autoencoder",
         "evaluate:EvalConfig", "evaluate:evaluate"),
]


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect

    so = json.loads(args.storage_options) if args.storage_options else None
    print(json.dumps(inspect(args.url, so), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-pipeline", description="latent caching, diffusion training "
                                     "and restoration as Ray jobs: one verb per stage")
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
        verb(cfg)
        return 0
    except (ConfigError, FileNotFoundError) as exc:
        print(f"latent-pipeline {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-pipeline {args.verb}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
