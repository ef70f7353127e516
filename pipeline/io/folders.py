"""The files a model folder may load, and their identity.

Every folder the project loads goes through here: a diffusers ``AutoencoderKL``, a transformers
text encoder with its tokenizer, each component of a diffusers pipeline, a spandrel network file,
and the project's own checkpoints (with the ``vae/`` and ``refiner/`` inside them). The rule is
one: **every file a loader reads lies inside the folder given**, and **the identity covers
exactly the files loaded**.

* :func:`file` resolves one name to a file inside the folder: an absolute name, a ``..``
  segment, or a symlink (at any level) whose target lies outside the folder is refused;
* :func:`weights` lists the weights a library loads from a folder: ``<base>.safetensors``, or
  ``<base>.safetensors.index.json`` and every shard its ``weight_map`` names, each checked by
  :func:`file` (an index naming ``../../elsewhere/model.safetensors`` is refused);
* :func:`digest` hashes those files (names and contents): the identity recorded in manifests and
  checkpoints;
* :func:`view` hands a library (transformers, diffusers) a private folder of links to exactly
  the files checked and hashed, so it cannot read any other file of the folder (a decoy weights
  file, an adapter config naming another model, code);
* :func:`check_safetensors` reads a safetensors header (truncated files, a header longer than
  the file or claiming tensors the file does not hold) before a library does, so a damaged file
  is named in one line;
* :func:`refuse_remote_code` refuses a folder whose configs ask for custom code (``auto_map``,
  ``trust_remote_code``) before any library is asked anything (transformers would prompt).

Refusals are :class:`~pipeline.errors.CheckpointError` naming the folder and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.errors import CheckpointError
from pipeline.io import storage

SAFETENSORS = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


def _inside(real: str, base: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _hub_blobs(base: str) -> str | None:
    """The ``blobs/`` folder of the Hugging Face cache repository whose snapshot ``base`` is (or
    lies in): ``.../models--org--name/snapshots/<revision>[/component]``, as the hub's download
    leaves it, keeps every file as a link into that repository's own ``blobs/``. Those links are
    the snapshot's own files (the identity hashes their contents all the same); a link anywhere
    else, another repository's blobs included, is still refused."""
    parts = base.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--")):
            return os.sep.join([*parts[:i], "blobs"])
    return None


def _allowed(real: str, base: str) -> bool:
    blobs = _hub_blobs(base)
    return _inside(real, base) or (blobs is not None and _inside(real, blobs) and os.path.dirname(real) == blobs)


def file(root: str, rel: str, where: str = "", *, named_by: str = "") -> str:
    """The real path of the file ``rel`` (a ``/``-separated name) in the local folder ``root``.

    Refused (CheckpointError naming ``where`` and ``rel``): a name that is absolute or has ``..``
    (``named_by``: the file that named it, such as an index), a name whose real path (every
    symlink resolved) lies outside the folder, and a name that is not a regular file.
    """
    where = where or root
    source = f"{named_by} names" if named_by else "the file"
    if not isinstance(rel, str) or not storage.safe_relpath(rel):
        raise CheckpointError(f"{where}: {source} {rel!r}, which is not a file inside the folder; refused")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, *rel.split("/")))
    if not _allowed(real, base):
        raise CheckpointError(
            f"{where}: {rel}{f' (named by {named_by})' if named_by else ''} is a link to a file outside the "
            "folder; refused (copy the file into the folder)"
        )
    if not os.path.isfile(real):
        raise CheckpointError(f"{where}: {rel}{f' (named by {named_by})' if named_by else ''} is not a file")
    return real


def subfolder(root: str, rel: str, where: str = "") -> str:
    """The real path of the folder ``rel`` inside ``root`` (a part such as a checkpoint's ``vae/``
    or a pipeline's component); refused when it is a link leaving ``root``."""
    where = where or root
    if not storage.safe_relpath(rel):
        raise CheckpointError(f"{where}: {rel!r} is not a folder inside it; refused")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, *rel.split("/")))
    if not _inside(real, base):
        raise CheckpointError(f"{where}: {rel}/ is a link to a folder outside it; refused (copy it into the folder)")
    return real


def has(root: str, rel: str) -> bool:
    """Whether ``root`` holds the name ``rel`` (a file, folder or link, even a dangling one)."""
    return os.path.lexists(os.path.join(root, *rel.split("/")))


def weights(root: str, base: str, where: str = "") -> list[str]:
    """The weight files a library loads for ``base`` (for example ``model`` or
    ``unet/diffusion_pytorch_model``): ``[<base>.safetensors]``, or ``[<base>.safetensors.index.json,
    shard, ...]`` with every shard its ``weight_map`` names (checked to lie inside ``root``), or
    ``[]`` when there are none. A folder with both is refused: which one a library reads differs
    between libraries."""
    where = where or root
    single, index = base + SAFETENSORS, base + INDEX_SUFFIX
    if has(root, single) and has(root, index):
        raise CheckpointError(f"{where}: both {single} and {index}; which weights would load is ambiguous: remove one")
    if has(root, index):
        real = file(root, index, where)
        try:
            with open(real, "rb") as f:
                data = json.loads(f.read())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where}: {index} is not readable JSON ({str(exc)[:80]})") from None
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{where}: {index} has no weight_map of tensor names to shard files")
        folder = posixpath.dirname(index)
        shards = []
        for name in sorted(set(wmap.values())):
            if not storage.safe_relpath(name):
                raise CheckpointError(
                    f"{where}: {index} names {name!r}, which is not a file inside the folder; refused"
                )
            rel = posixpath.join(folder, name) if folder else name
            file(root, rel, where, named_by=index)
            shards.append(rel)
        return [index, *shards]
    if has(root, single):
        file(root, single, where)
        return [single]
    return []


def digest(root: str, rels: Iterable[str], where: str = "") -> str:
    """The sha256 over ``rels`` (names and contents, in name order): what an identity records.
    A single file's digest is not its plain sha256 (see :func:`storage.sha256_file` for that)."""
    h = hashlib.sha256()
    for rel in sorted(rels):
        h.update(rel.encode() + b"\0" + storage.sha256_file(file(root, rel, where)).encode())
    return h.hexdigest()


def check_safetensors(root: str, rel: str, where: str = "") -> None:
    """Refuse a safetensors file whose header is damaged (truncated, too long, or claiming
    tensors the file does not hold), naming it, before a library reads it."""
    from safetensors import SafetensorError, safe_open

    real = file(root, rel, where)
    try:
        with safe_open(real, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"{where or root}: {rel} is not a readable safetensors file ({detail})") from None


REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipeline")


def refuse_remote_code(root: str, rels: Iterable[str], where: str = "") -> None:
    """Refuse a folder whose JSON configs ask for code shipped with the model (``auto_map`` and
    the like), before any library reads them: no code from a folder runs."""
    for rel in rels:
        if not rel.endswith(".json") or rel.endswith(INDEX_SUFFIX) or not has(root, rel):
            continue
        try:
            with open(file(root, rel, where), "rb") as f:
                data: Any = json.loads(f.read())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where or root}: {rel} is not readable JSON ({str(exc)[:80]})") from None
        found = [k for k in REMOTE_CODE_KEYS if isinstance(data, dict) and data.get(k)]
        if found:
            raise CheckpointError(
                f"{where or root}: {rel} asks for custom code ({found[0]}); only models built into the "
                "libraries are loaded, no code from the folder runs"
            )


@contextmanager
def view(root: str, rels: Iterable[str], where: str = "") -> Iterator[str]:
    """A private folder holding links to exactly ``rels`` of ``root`` (each checked by
    :func:`file`), for a library to load from; removed afterwards."""
    paths = {rel: file(root, rel, where) for rel in rels}
    out = tempfile.mkdtemp(prefix="latent-pipeline-view-")
    try:
        for rel, real in paths.items():
            dest = os.path.join(out, *rel.split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.symlink(real, dest)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
