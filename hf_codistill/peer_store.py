"""A peer store: where groups launched apart publish their models and read each other's.

Anil et al. (2018) ran their codistilled groups as separate jobs that met only through checkpoints on a shared file
system. A store is that meeting place: a directory, or any fsspec URL (`s3://`, `gs://`, `hf://` through
`huggingface_hub`'s file system). Each group writes under its own folder, one folder per published version:

    <store>/group_<g>/step-000000050/config.json          the model's config (`architectures` names its class)
                                     model.safetensors    its weights (each shared tensor once)
                                     manifest.json        written last: step, time, size and sha256 of the weights
    <store>/group_<g>/init/...                             group 0's initial weights, for a shared initialisation

A version counts once its manifest exists, and is loaded only if the weights match the manifest's checksum, so a
version cut short by a crash or a truncated copy is skipped with a warning and never loaded. Every file is written
under a temporary name and renamed. Each folder is a `from_pretrained` folder. Only safetensors are read (no pickle)
and model classes come from `transformers` itself (no remote code).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import fsspec
import torch
import transformers
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
INIT_VERSION = "init"
_VERSION_RE = re.compile(r"^step-(\d+)$")


def _step_of(version_name: str) -> int:
    return int(_VERSION_RE.match(version_name)[1])


def redacted(url: str) -> str:
    """The URL without credentials, for logs and errors."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def published_tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors of `model` that a version holds: persistent parameters and buffers, each tied tensor once."""
    persistent = set(model.state_dict())
    tensors = dict(model.named_parameters())  # tied parameters appear once
    tensors.update(model.named_buffers())
    return {name: tensor for name, tensor in tensors.items() if name in persistent}


def published_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What a version holds (`published_tensors_of`), detached on the CPU, the floating-point ones in `dtype` if
    given."""
    out = {}
    for name, tensor in published_tensors_of(model).items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.cpu().contiguous()
    return out


def output_space(model: nn.Module) -> dict:
    """What a model predicts over, which peers must share: its vocabulary (language models) or its labels."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return {"kind": "vocabulary", "size": int(head.weight.shape[0])}
    return {"kind": "labels", "size": int(getattr(model.config, "num_labels", 0))}


def describe(config: dict, outputs: dict) -> str:
    """E.g. "GPT2LMHeadModel over a vocabulary of 50257", "ViTForImageClassification over 10 labels"."""
    space = (f"a vocabulary of {outputs['size']}" if outputs["kind"] == "vocabulary"
             else f"{outputs['size']} {outputs['kind']}")
    return f"{(config.get('architectures') or ['?'])[0]} over {space}"


@dataclass
class PublishedVersion:
    """One version of a group's model in the store, as its manifest describes it."""

    group: int
    name: str
    step: int
    time: float
    sha256: str
    num_bytes: int
    outputs: dict


@dataclass
class LoadedVersion:
    """A version read and checked: its manifest, its config (as a dict) and its weights' bytes."""

    version: PublishedVersion
    config: dict
    weights: bytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_safetensors(self.weights)


class PeerStore:
    """Publish this group's versions to a store and read the other groups' newest ones (see the module docstring)."""

    def __init__(self, url: str, group: int, keep: int = 2, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.group = group
        self.keep = keep
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.bytes_written = 0
        self.bytes_read = 0

    def _folder(self, group: int, name: str | None = None) -> str:
        folder = f"{self.root}/group_{group}"
        return f"{folder}/{name}" if name is not None else folder

    def _write(self, path: str, data: bytes) -> None:
        partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        with self.fs.open(partial, "wb") as f:
            f.write(data)
        self.fs.mv(partial, path)
        self.bytes_written += len(data)

    # ---- Publishing (rank 0 of a group) -----------------------------------------------------------------------

    def publish(self, model: nn.Module, step: int, dtype: torch.dtype | None = None,
                name: str | None = None) -> PublishedVersion:
        """Write `model` as version `step-<step>` (or `name`), manifest last, then prune this group's old versions."""
        name = name or f"step-{step:09d}"
        folder = self._folder(self.group, name)
        self.fs.makedirs(folder, exist_ok=True)
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        weights = save_safetensors(published_tensors(model, dtype), metadata={"format": "pt"})
        self._write(f"{folder}/{CONFIG_NAME}", json.dumps(config, indent=2, sort_keys=True).encode())
        self._write(f"{folder}/{WEIGHTS_NAME}", weights)
        version = PublishedVersion(self.group, name, step, time.time(), hashlib.sha256(weights).hexdigest(),
                                   len(weights), output_space(model))
        self._write(f"{folder}/{MANIFEST_NAME}", json.dumps(version.__dict__, indent=2).encode())
        if name != INIT_VERSION:
            self.prune(step)
        return version

    def prune(self, step: int) -> None:
        """After publishing step `step`: drop this group's versions past it (a resumed group's, from the trajectory
        it abandoned) and keep the newest `keep` of the rest (a reader may still be reading the one before)."""
        names = self._version_names(self.group)
        ahead = [name for name in names if _step_of(name) > step]
        for name in ahead + [name for name in names if name not in ahead][self.keep:]:
            self.fs.rm(self._folder(self.group, name), recursive=True)

    def clear(self) -> None:
        """Remove this group's versions: a fresh run must not leave an earlier run's models for its peers."""
        if self.fs.exists(self._folder(self.group)):
            self.fs.rm(self._folder(self.group), recursive=True)

    # ---- Reading ----------------------------------------------------------------------------------------------

    def _version_names(self, group: int) -> list[str]:
        """The group's step versions that have a manifest, newest first."""
        try:
            # File systems that cache listings (s3fs, gcsfs) would show the versions of the first listing forever.
            self.fs.invalidate_cache(self._folder(group))
            entries = self.fs.ls(self._folder(group), detail=False)
        except FileNotFoundError:
            return []
        except OSError as error:  # the store unreachable for now: no versions this time, never a crash
            logger.warning(f"Cannot list {redacted(self.url)}/group_{group} ({type(error).__name__}): will retry.")
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        return sorted((n for n in names if _VERSION_RE.match(n)), key=_step_of, reverse=True)

    def read_newest(self, group: int, newer_than: int | None = None) -> LoadedVersion | None:
        """Group `group`'s newest intact version (past step `newer_than`, if given), or None; versions that are
        half-written, corrupt or pruned meanwhile are skipped with a warning."""
        for name in self._version_names(group):
            if newer_than is not None and _step_of(name) <= newer_than:
                return None
            loaded = self.read(group, name)
            if loaded is not None:
                return loaded
        return None

    def read(self, group: int, name: str) -> LoadedVersion | None:
        """One version, checked against its manifest; None (with a warning) if it is missing, incomplete or corrupt."""
        folder = self._folder(group, name)
        try:
            manifest = json.loads(self.fs.cat_file(f"{folder}/{MANIFEST_NAME}"))
            version = PublishedVersion(**manifest)
            weights = self.fs.cat_file(f"{folder}/{WEIGHTS_NAME}")
            config = json.loads(self.fs.cat_file(f"{folder}/{CONFIG_NAME}"))
        except FileNotFoundError:
            return None  # not published yet, or pruned while we read
        except OSError as error:
            logger.warning(f"Cannot read {redacted(self.url)}/group_{group}/{name} ({type(error).__name__}).")
            return None
        except (ValueError, TypeError) as error:  # a manifest or config that is not what this module writes
            logger.warning(f"Skipping {redacted(self.url)}/group_{group}/{name}: unreadable ({error}).")
            return None
        self.bytes_read += len(weights)
        if len(weights) != version.num_bytes or hashlib.sha256(weights).hexdigest() != version.sha256:
            logger.warning(
                f"Skipping {redacted(self.url)}/group_{group}/{name}: its weights do not match its manifest's "
                f"checksum ({len(weights)} of {version.num_bytes} bytes); a truncated or corrupt copy is never loaded."
            )
            return None
        return LoadedVersion(version, config, weights)

    def wait_for(self, group: int, name: str, timeout: float, poll: float = 0.5) -> LoadedVersion | None:
        """Version `name` of group `group` once it is intact, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            loaded = self.read(group, name)
            if loaded is not None or time.monotonic() >= deadline:
                return loaded
            time.sleep(poll)


def build_peer(loaded: LoadedVersion) -> nn.Module:
    """A frozen model of the class and config a version names; only classes of `transformers` itself are built."""
    architectures = loaded.config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"Group {loaded.version.group}'s published config names architecture {architectures}, which is not a "
            "model class of `transformers`: the store only builds those (no remote code)."
        )
    config = cls.config_class.from_dict(loaded.config)
    model = cls(config)
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], group: int) -> None:
    """Copy a version's tensors into `model`, which must have every one of them with the same shape."""
    for name, target in published_tensors_of(model).items():
        if name not in tensors or tensors[name].shape != target.shape:
            raise ValueError(
                f"Group {group}'s published weights do not fit its published config at `{name}` "
                f"({'missing' if name not in tensors else tuple(tensors[name].shape)} vs {tuple(target.shape)})."
            )
        target.copy_(tensors[name])
