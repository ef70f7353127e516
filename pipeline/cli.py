"""The ``latent-pipeline`` console script: one verb per stage, each ``--config FILE.yaml`` + flags.

Each verb's options are the fields of its typed config dataclass (option groups flattened into
plain flags); a YAML file may hold them at the top level or under a section named after the verb
(``encode:``), and flags override it. Every mistake ends in one line that names it and a
non-zero exit: 2 for a wrong option or input, 1 for a job that ran and failed; ``--verbose``
adds the traceback and the libraries' own logs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any

from pipeline import config as cfgmod
from pipeline.errors import USER_ERRORS, ConfigError, JobFailed, UserError

log = logging.getLogger("pipeline")
# a wrong path the user gave (exit 2, as a ConfigError); any other exception is exit 1
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


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
    Verb(
        "demo",
        "run the whole workflow on local Ray, local folders and bundled sample photos",
        "stages.demo:DemoConfig",
        "stages.demo:run_demo",
    ),
    Verb(
        "shards",
        "pack a folder of images into WebDataset image shards",
        "stages.shards:ShardsConfig",
        "stages.shards:run_shards",
        positional=("src", "out"),
    ),
    Verb(
        "train-vae",
        "train the built-in KL autoencoder on image shards with Ray Train",
        "train.autoencoder:VAETrainConfig",
        "train.autoencoder:run_train_vae",
    ),
    Verb(
        "train-refiner",
        "train a restoration task's pixel refiner on image shards with Ray Train (bundle it with train "
        "--refiner; an inpainting refiner is restore --task inpaint's checkpoint itself)",
        "stages.train_refiner:RefinerTrainConfig",
        "stages.train_refiner:run_train_refiner",
    ),
    Verb(
        "encode",
        "encode image shards into latent shards with Ray tasks",
        "stages.encode:EncodeConfig",
        "stages.encode:run_encode",
    ),
    Verb(
        "train",
        "train a latent diffusion model on cached latents with Ray Train",
        "train.diffusion:TrainConfig",
        "stages.train:run_train",
    ),
    Verb(
        "finetune",
        "fine-tune a pretrained diffusers base's denoiser (LoRA or full) on its latent cache with Ray Train",
        "train.finetune:FinetuneConfig",
        "train.finetune:run_finetune",
    ),
    Verb(
        "export",
        "export a finetune checkpoint: LoRA weights for load_lora_weights, or a complete pipeline folder",
        "stages.export:ExportConfig",
        "stages.export:run_export",
    ),
    Verb(
        "sample",
        "draw samples from a diffusion checkpoint into a PNG grid",
        "stages.sample:SampleConfig",
        "stages.sample:run_sample",
    ),
    Verb(
        "restore",
        "restore / upscale images in bulk with Ray Data actors",
        "stages.restore:RestoreConfig",
        "stages.restore:run_restore",
    ),
    Verb(
        "eval",
        "score a restoration checkpoint against bicubic, Lanczos and the autoencoder",
        "stages.eval:EvalConfig",
        "stages.eval:evaluate",
    ),
    Verb(
        "inspect",
        "summarise a latent dataset, image shards or a checkpoint (--verify: check every shard)",
        "stages.inspect:InspectConfig",
        "stages.inspect:run_inspect",
        positional=("url",),
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latent-pipeline",
        description="latent caching, diffusion training and restoration as Ray jobs: one verb per stage",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        p.add_argument("--config", help="YAML file of options (flags override it)")
        p.add_argument(
            "-v", "--verbose", action="store_true", help="show Ray's and the libraries' logs, and tracebacks"
        )
        cfgmod.add_arguments(p, verb.config_cls(), positional=verb.positional)
        p.set_defaults(_verb=verb)
    return parser


# the project's own errors, as a traceback's last line names them: ``pipeline.errors.ConfigError: ...``
_BY_NAME: dict[str, type[UserError]] = {f"{c.__module__}.{c.__qualname__}": c for c in USER_ERRORS}
_RAISED_IN_RAY = re.compile(rf"^({'|'.join(map(re.escape, _BY_NAME))}): (.+)$", re.M)


def as_user_error(exc: BaseException) -> BaseException:
    """The :class:`UserError` behind ``exc`` where there is one, else ``exc``: a user error
    raised inside a Ray task, actor or Train worker (a task's comes as ``.cause``; an actor's
    creation error and a Train worker's survive only as the text of their traceback, whose last
    such line is the error), a full disk, or a path the user gave that is missing or unreadable."""
    if type(exc).__module__.startswith("ray."):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, UserError):
            return cause
        found = _RAISED_IN_RAY.findall(str(exc))
        if found:
            return _BY_NAME[found[-1][0]](found[-1][1])
        if isinstance(cause, OSError):
            exc = cause
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        return JobFailed(f"no space left on the device{where}: free space and re-run")
    if isinstance(exc, _PATH_ERRORS) and exc.filename:
        kind = type(exc).__name__.replace("Error", "").replace("NotADirectory", "not a directory")
        return ConfigError(f"{kind}: {exc.filename}")
    if isinstance(exc, _PATH_ERRORS):
        return ConfigError(str(exc))
    return exc


def _one_line(exc: BaseException) -> str:
    from pipeline.io.storage import redact

    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    lines = [ln.strip() for ln in redact(text).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Parameter validation failed:" says nothing alone
        lines[0] = f"{lines[0]} {lines[1]}"
    return (lines[0] if lines else type(exc).__name__)[:500]


def main(argv: list[str] | None = None) -> int:
    from pipeline.console import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    verb: Verb = args._verb
    try:
        cfg: Any = cfgmod.from_args(verb.config_cls(), args, section=verb.name.replace("-", "_"))
        verb(cfg)
        return 0
    except KeyboardInterrupt:
        print(f"latent-pipeline {verb.name}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            log.exception("traceback")
        error = as_user_error(exc)
        user = isinstance(error, UserError)
        hint = "" if user or args.verbose else " (run with --verbose for the traceback)"
        print(f"latent-pipeline {verb.name}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return error.exit_code if isinstance(error, UserError) else 1


if __name__ == "__main__":
    sys.exit(main())
