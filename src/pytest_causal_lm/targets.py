"""What a test runs on: a checkpoint on one device in one dtype, its identity and its display name.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .tiny import TINY_PREFIX, is_tiny

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["Target", "short_name", "targets_of", "with_unique_labels"]


@dataclass(frozen=True)
class Target:
    """What to load: one checkpoint on one device in one dtype. Hashable; the cache key.

    ``label`` is the display name, unique within a session (see ``with_unique_labels``);
    it takes no part in equality, so two checkpoints with one folder name stay two targets.
    """

    checkpoint: str
    device: str
    dtype: str
    revision: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    device_map: str | None = None
    max_memory: str | None = None  # accelerate's, as the option gives it: "cpu=2GB,0=20GiB"
    label: str = field(default="", compare=False)

    @property
    def id(self) -> str:
        """Readable test id: ``SmolLM2-135M-Instruct-cpu-float32`` (``@rev`` and ``map-auto`` when set)."""
        return self.label or self.labelled(1).label

    @property
    def key(self) -> str:
        """The full identity as one string: what reports and benchmark results are keyed on."""
        parts = [
            self.checkpoint,
            f"revision={self.revision or 'default'}",
            f"device={self.device}",
            f"dtype={self.dtype}",
        ]
        if self.device_map:
            parts.append(f"device_map={self.device_map}")
        if self.max_memory:
            parts.append(f"max_memory={self.max_memory}")
        return " ".join(parts)

    @classmethod
    def from_key(cls, key: str) -> Target:
        """The target whose ``key`` this is (reports are keyed on it)."""
        words = key.split(" ")
        fields: dict[str, str] = {}
        while words and "=" in words[-1] and words[-1].split("=", 1)[0] in _KEY_FIELDS:
            name, value = words.pop().split("=", 1)
            fields[name] = value
        revision = fields.get("revision")
        return cls(
            checkpoint=" ".join(words),
            device=fields.get("device", "cpu"),
            dtype=fields.get("dtype", "float32"),
            revision=None if revision in (None, "default") else revision,
            device_map=fields.get("device_map"),
            max_memory=fields.get("max_memory"),
        )

    def labelled(self, depth: int) -> Target:
        """This target, labelled with the last ``depth`` components of its checkpoint's path or Hub id."""
        name = short_name(self.checkpoint, depth) + (f"@{self.revision}" if self.revision else "")
        device = f"map-{self.device_map}" if self.device_map else self.device
        return replace(self, label=f"{name}-{device}-{self.dtype}")


_KEY_FIELDS = ("revision", "device", "dtype", "device_map", "max_memory")


def with_unique_labels(targets: list[Target]) -> list[Target]:
    """Label every target so no two share a display name: parent folders or the org are added where names collide."""
    depths = dict.fromkeys(targets, 1)
    while True:
        labelled = [t.labelled(depths[t]) for t in targets]
        counts = Counter(t.label for t in labelled)
        growing = [t for t, lt in zip(targets, labelled, strict=True) if counts[lt.label] > 1 and depths[t] < _depth(t)]
        if not growing:
            break
        for target in growing:
            depths[target] += 1
    seen: Counter[str] = Counter()
    unique = []
    for target in labelled:  # the same folder spelt two ways ("./m" and "m") still gets two names
        seen[target.label] += 1
        unique.append(
            target if seen[target.label] == 1 else replace(target, label=f"{target.label}#{seen[target.label]}")
        )
    return unique


def _components(checkpoint: str) -> list[str]:
    return [part for part in checkpoint.replace("\\", "/").split("/") if part not in ("", ".", "..", "~")]


def _depth(target: Target) -> int:
    return max(1, len(_components(target.checkpoint)))


def short_name(checkpoint: str, depth: int = 1) -> str:
    """The last ``depth`` components of a Hub id or path, joined by "-" (``tiny:qwen3`` becomes ``tiny-qwen3``)."""
    if is_tiny(checkpoint):
        return "tiny-" + checkpoint.removeprefix(TINY_PREFIX)
    parts = _components(checkpoint) or [checkpoint]
    parts[-1] = parts[-1].removesuffix(".gguf") or parts[-1]
    return "-".join(parts[-depth:])


def targets_of(settings: Settings) -> list[Target]:
    """Every checkpoint x device combination to test, ``auto`` devices resolved, each with a unique label."""
    from .devices import resolve_device

    devices = ["cpu"] if settings.device_map else list(dict.fromkeys(resolve_device(d) for d in settings.device))
    targets = [
        Target(
            checkpoint=checkpoint,
            device=device,
            dtype=settings.dtype,
            revision=settings.revision,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
            device_map=settings.device_map,
            max_memory=settings.max_memory if settings.device_map else None,
        )
        for checkpoint in dict.fromkeys(settings.checkpoint)
        for device in devices
    ]
    return with_unique_labels(targets)
