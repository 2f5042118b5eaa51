"""What a checkpoint's files say without loading it: which files it has, their size, the dtype they store.

Headers are read directly (safetensors' JSON header, GGUF metadata up to the key needed), never the weights.
Importing this module does not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .tiny import is_tiny

__all__ = ["gguf_location", "looks_local", "stored_dtype", "weights_size"]


# safetensors and GGUF names of the float types, as torch names them
_FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def stored_dtype(location: str, gguf_file: str | None = None, revision: str | None = None) -> str | None:
    """The dtype most of a checkpoint's tensors are stored in, or None where the files do not say."""
    import json
    from collections import Counter

    if gguf_file is not None:
        path = Path(location) / gguf_file
        kind = _gguf_file_type(path)
        if kind is None:  # no general.file_type: count the tensors' types (GGUFReader parses the whole header)
            from gguf import GGUFReader

            kinds = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
            kind = kinds.most_common(1)[0][0] if kinds else None
        return _FLOAT_NAMES.get(kind, kind)
    config = _checkpoint_file(location, "config.json", revision)
    declared = json.loads(config.read_text()) if config else {}
    named = declared.get("dtype") or declared.get("torch_dtype")
    if named:
        return str(named).removeprefix("torch.")
    shards = _safetensors_shards(location, revision)
    if not shards:
        return None
    with open(
        next(iter(shards.values())), "rb"
    ) as handle:  # the first shard speaks for the rest  # the header: 8-byte length, then JSON of every tensor's dtype
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    kinds = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return _FLOAT_NAMES.get(kinds.most_common(1)[0][0]) if kinds else None


def _safetensors_shards(location: str, revision: str | None) -> dict[str, Path]:
    """``{shard file name: path}`` of a checkpoint's safetensors weights, in order (empty when it has none)."""
    import json

    single = _checkpoint_file(location, "model.safetensors", revision)
    if single is not None:
        return {single.name: single}
    index = _checkpoint_file(location, "model.safetensors.index.json", revision)
    if index is None:
        return {}
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    found = {name: _checkpoint_file(location, name, revision) for name in names}
    return {name: path for name, path in found.items() if path is not None}


_GGUF_FILE_TYPES = {"ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16"}


def _gguf_file_type(path: Path) -> str | None:
    """The GGUF's ``general.file_type`` (``Q4_1``, ``F16``, ...), reading the metadata only up to that key.

    GGUFReader would parse the whole header first, tokenizer vocabulary included: 1.6 s (and 0.2 s of garbage
    collection after) on SmolLM2's file, for one number that sits among the first keys.
    """
    import struct

    from gguf import GGUFValueType, LlamaFileType

    scalar = {GGUFValueType.BOOL: 1, GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2}
    scalar |= {GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4}
    scalar |= {GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    with open(path, "rb") as handle:

        def read(fmt: str) -> tuple[Any, ...]:
            return struct.unpack("<" + fmt, handle.read(struct.calcsize("<" + fmt)))

        def skip(kind: GGUFValueType) -> None:
            if kind == GGUFValueType.STRING:
                handle.seek(read("Q")[0], 1)
            elif kind == GGUFValueType.ARRAY:
                item, count = read("IQ")
                for _ in range(count):
                    skip(GGUFValueType(item))
            else:
                handle.seek(scalar[kind], 1)

        magic, version, _, entries = read("4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):  # a big-endian or unknown layout: let GGUFReader decide
            return None
        for _ in range(entries):
            key = handle.read(read("Q")[0]).decode("utf-8", "replace")
            kind = GGUFValueType(read("I")[0])
            if key == "general.file_type" and kind in (GGUFValueType.UINT32, GGUFValueType.INT32):
                name = LlamaFileType(read("I")[0]).name
                return _GGUF_FILE_TYPES.get(name, name.removeprefix("MOSTLY_"))
            skip(kind)
    return None


def _checkpoint_file(location: str, name: str, revision: str | None) -> Path | None:
    """A file of a local checkpoint folder, or of a Hub checkpoint from the local cache (no download)."""
    path = Path(location).expanduser() / name
    if path.is_file():
        return path
    if Path(location).expanduser().exists() or "/" not in location:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, name, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def gguf_location(checkpoint: str) -> tuple[str, str | None]:
    """(directory or Hub id, gguf file name or None) for ``checkpoint``."""
    path = Path(checkpoint).expanduser()
    if checkpoint.endswith(".gguf"):
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
    return checkpoint, None


def looks_local(checkpoint: str) -> bool:
    return (
        checkpoint.startswith((".", "/", "~", "\\"))
        or os.path.isabs(checkpoint)
        or checkpoint.count("/") > 1
        or checkpoint.endswith(".gguf")
    )


# What a loadable checkpoint directory holds besides config.json, by file name patterns.
WEIGHT_FILES = "weights (*.safetensors, pytorch_model*.bin)"


CHECKPOINT_PARTS = {
    WEIGHT_FILES: (
        "*.safetensors",
        "*.safetensors.index.json",
        "*.bin",
        "*.pt",
        "*.pth",
    ),
    "tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json)": (
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "*.tiktoken",
        "spiece.model",
    ),
}


def weights_size(checkpoint: str) -> int | None:
    """Bytes of a local checkpoint's weight files (a .gguf file's size); None for a Hub id."""
    if is_tiny(checkpoint):
        return 0
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0 if looks_local(checkpoint) else None
    files = {f for pattern in (*CHECKPOINT_PARTS[WEIGHT_FILES], "*.gguf") for f in path.glob(pattern)}
    return sum(f.stat().st_size for f in files)
