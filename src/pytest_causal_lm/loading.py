"""Loading checkpoints through ``from_pretrained``, once per session, with short load errors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint_files import CHECKPOINT_PARTS, gguf_location, looks_local, stored_dtype
from .targets import Target
from .tiny import is_tiny, materialize
from .tolerances import Tolerance

if TYPE_CHECKING:
    from .precision import NoiseFloor

__all__ = ["CausalLM", "CheckpointLoadError", "ModelCache", "load", "pretrained_location"]


@dataclass
class CausalLM:
    """A loaded checkpoint with everything a check needs, as the ``causal_lm`` fixture gives it."""

    target: Target
    model: Any
    tokenizer: Any
    tolerance: Tolerance
    seed: int = 0
    source: str = ""
    noise: NoiseFloor | None = None  # measured rounding noise of a half-precision run (precision.py)
    loading_info: dict[str, Any] = field(default_factory=dict)  # from_pretrained's: missing, unexpected keys

    @property
    def checkpoint(self) -> str:
        return self.target.checkpoint

    @property
    def revision(self) -> str | None:
        return self.target.revision

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def config(self) -> Any:
        return self.model.config

    def pretrained_location(self) -> tuple[str, dict[str, Any]]:
        """``(path or Hub id, from_pretrained kwargs)`` that loaded this checkpoint, to load siblings alike."""
        return pretrained_location(self.target, self.source)

    @property
    def stored_dtype(self) -> str | None:
        """The dtype the checkpoint's files hold (``bfloat16``, ``float32``, a GGUF type such as ``Q4_1``),
        read from the files, not from the loaded model (whose config reports the dtype it was loaded in)."""
        location, kwargs = self.pretrained_location()
        return stored_dtype(location, kwargs.get("gguf_file"), self.revision)


class CheckpointLoadError(Exception):
    """A checkpoint could not be loaded; the message says why and what to do."""


def _check_local(checkpoint: str, location: str, gguf_file: str | None) -> None:
    path = Path(location).expanduser()
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise CheckpointLoadError(f"GGUF file {path / gguf_file} does not exist. Fix: check the path.")
        return
    if not path.exists():
        if looks_local(checkpoint):
            raise CheckpointLoadError(f"checkpoint path {checkpoint} does not exist. Fix: check the path.")
        return  # a Hub id
    if not path.is_dir():
        raise CheckpointLoadError(
            f"checkpoint {checkpoint} is a file, not a checkpoint directory or .gguf file. "
            "Fix: pass the directory that holds config.json."
        )
    if not (path / "config.json").exists():
        ggufs = list(path.glob("*.gguf"))
        hint = (
            f" It holds {len(ggufs)} .gguf files: pass one of them as the checkpoint."
            if ggufs
            else " Fix: pass the directory written by save_pretrained (config.json + weights)."
        )
        raise CheckpointLoadError(f"checkpoint directory {checkpoint} has no config.json.{hint}")
    missing = [
        part for part, patterns in CHECKPOINT_PARTS.items() if not any(next(path.glob(p), None) for p in patterns)
    ]
    if missing:
        raise CheckpointLoadError(
            f"checkpoint directory {checkpoint} has config.json but no {' and no '.join(missing)}. "
            "Fix: write what is missing with model.save_pretrained(dir) / tokenizer.save_pretrained(dir)."
        )


def explain_load_error(exc: BaseException, checkpoint: str, what: str) -> str:
    """One short, actionable message for a failed ``from_pretrained`` of ``what`` (model/tokenizer)."""
    name = type(exc).__name__
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else name
    lowered = text.lower()
    if "trust_remote_code" in lowered or "custom code" in lowered:
        return (
            f"{checkpoint} needs its own modeling code (trust_remote_code). "
            "Fix: review the code, then pass --causal-lm-trust-remote-code."
        )
    if name == "GatedRepoError" or "gated repo" in lowered:
        return (
            f"{checkpoint} is a gated Hub repository. Fix: accept its licence on the Hub, "
            "then `hf auth login` (or set HF_TOKEN)."
        )
    if name == "RepositoryNotFoundError":
        return (
            f"{checkpoint} was not found on the Hub (misspelt, private, or a local path that does not "
            f"exist). Fix: check the id, or log in for a private repository.{_if_local_folder(checkpoint)}"
        )
    if any(
        cls.__name__ in ("ConnectError", "ConnectTimeout", "NetworkError", "ConnectionError")
        for cls in type(exc).__mro__
    ):
        return (
            f"{checkpoint} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({name}: {first_line}). Fix: download it first (`hf download {checkpoint}`) or pass a local directory."
            + _if_local_folder(checkpoint)
        )
    if name == "RevisionNotFoundError":
        return f"revision of {checkpoint} not found on the Hub. Fix: check --causal-lm-revision."
    if (
        name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
        or "offline" in lowered
        or "couldn't connect" in lowered
        or "connection" in lowered
    ):
        return (
            f"{checkpoint} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline, HF_HUB_OFFLINE=1 or no network). Fix: download it first (`hf download {checkpoint}`) "
            "or pass a local directory." + _if_local_folder(checkpoint)
        )
    if "gguf" in lowered and isinstance(exc, ImportError | ModuleNotFoundError):
        return f"{checkpoint} is a GGUF file and needs the gguf package. Fix: pip install gguf accelerate."
    if isinstance(exc, ImportError) and "accelerate" in lowered:
        return f"{checkpoint} needs the accelerate package to load. Fix: pip install accelerate."
    if what == "tokenizer":
        return (
            f"no usable tokenizer in {checkpoint} ({name}: {first_line}). "
            "Fix: save the tokenizer next to the weights (tokenizer.save_pretrained)."
        )
    if "safetensors" in lowered or "header" in lowered or "deserializ" in lowered:
        return f"weights of {checkpoint} could not be read ({name}: {first_line}). Fix: re-save or re-download them."
    return f"could not load the {what} of {checkpoint}: {name}: {first_line}"


def _if_local_folder(checkpoint: str) -> str:
    """``org/name`` that is no local folder was taken for a Hub id; it may have been meant as a folder."""
    if "/" not in checkpoint or looks_local(checkpoint):
        return ""
    return f" If you meant a local folder: there is no {checkpoint} in {Path.cwd()} (pass ./{checkpoint} to say so)."


_MIN_TOKENIZER_SIZE = 16


def pretrained_location(target: Target, source: str) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``target`` from, and the kwargs every Auto class needs for it."""
    location, gguf_file = gguf_location(source)
    kwargs: dict[str, Any] = {"trust_remote_code": target.trust_remote_code}
    if target.revision:
        kwargs["revision"] = target.revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if target.attn_implementation:
        kwargs["attn_implementation"] = target.attn_implementation
    return location, kwargs


def load(target: Target, *, seed: int, atol: float | None = None, rtol: float | None = None) -> CausalLM:
    """Load ``target`` through the Auto classes, in eval mode with gradients off.

    Raises ``CheckpointLoadError`` with a one-paragraph explanation on any failure.
    """
    from .devices import torch_dtype
    from .precision import calibrated_tolerance, measure_noise_floor
    from .tolerances import tolerance_for

    source = _build_tiny(target.checkpoint) if is_tiny(target.checkpoint) else target.checkpoint
    location, model_kwargs = pretrained_location(target, source)
    gguf_file = model_kwargs.get("gguf_file")
    _check_local(target.checkpoint, location, gguf_file)
    if not Path(location).expanduser().exists():  # a Hub id
        model_kwargs.update(_hub_access(target.checkpoint, target.revision))
    common = {k: v for k, v in model_kwargs.items() if k != "attn_implementation"}
    if gguf_file and not _module_available("gguf"):
        raise CheckpointLoadError(
            f"{target.checkpoint} is a GGUF file and needs the gguf package. Fix: pip install gguf accelerate."
        )

    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **common)
    except Exception as exc:
        raise CheckpointLoadError(explain_load_error(exc, target.checkpoint, "tokenizer")) from exc
    if len(tokenizer) < _MIN_TOKENIZER_SIZE:  # transformers 5 builds an empty tokenizer when the files are missing
        raise CheckpointLoadError(
            f"no usable tokenizer in {target.checkpoint} ({type(tokenizer).__name__} with {len(tokenizer)} tokens: "
            "the tokenizer files are missing). Fix: save the tokenizer next to the weights (tokenizer.save_pretrained)."
        )
    model_kwargs["dtype"] = torch_dtype(target.dtype)
    if target.device_map:
        model_kwargs["device_map"] = target.device_map  # accelerate spreads the weights; no .to() afterwards
    if target.max_memory:
        model_kwargs["max_memory"] = parse_max_memory(target.max_memory)
        model_kwargs["offload_folder"] = _offload_folder()
    try:
        model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
            location, output_loading_info=True, **model_kwargs
        )
        if not target.device_map:
            model.to(_placed_device(target.device))
    except Exception as exc:
        raise CheckpointLoadError(explain_load_error(exc, target.checkpoint, "model")) from exc
    model.eval()
    model.requires_grad_(False)
    tolerance = tolerance_for(model.dtype, atol=atol, rtol=rtol)
    noise = None if atol is not None else measure_noise_floor(model, tokenizer)  # an explicit atol is the user's
    return CausalLM(
        target=target,
        model=model,
        tokenizer=tokenizer,
        tolerance=calibrated_tolerance(tolerance, noise),
        seed=seed,
        source=source,
        noise=noise,
        loading_info=loading_info,
    )


def _placed_device(device: str) -> str:
    """The device this process loads onto: an xdist worker's own GPU for a bare ``cuda`` (``worker_device``)."""
    if device != "cuda":
        return device
    import torch

    from .devices import worker_device

    return worker_device(device, os.environ.get("PYTEST_XDIST_WORKER"), torch.cuda.device_count())


def parse_max_memory(text: str) -> dict[Any, str]:
    """``"0=20GiB,cpu=60GiB"`` as accelerate's ``max_memory``: ``{0: "20GiB", "cpu": "60GiB"}``."""
    memory: dict[Any, str] = {}
    for part in text.split(","):
        device, _, size = part.strip().partition("=")
        if not device or not size:
            raise ValueError(f"max_memory entry {part!r} is not DEVICE=SIZE (e.g. cpu=2GB)")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def _offload_folder() -> str:
    """A folder for the layers accelerate offloads to disk, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="causal-lm-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _hub_access(checkpoint: str, revision: str | None) -> dict[str, Any]:
    """One quick request tells whether the Hub answers, instead of a minute of retries per file when it does not.

    Cached and unreachable: load from the cache only. Not cached and unreachable: a load error at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return {}
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(checkpoint, "config.json", revision=revision), str)
    try:
        HfApi().model_info(checkpoint, revision=revision, timeout=10)
    except Exception as exc:
        if cached and not _is_hub_answer(exc):
            return {"local_files_only": True}
        raise CheckpointLoadError(explain_load_error(exc, checkpoint, "model")) from None
    return {}


def _is_hub_answer(exc: BaseException) -> bool:
    """The Hub answered (not found, gated, ...), as opposed to a network failure."""
    return type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")


def _build_tiny(checkpoint: str) -> str:
    """The directory of a built-in tiny checkpoint; a name that cannot be built is a load error, said once."""
    try:
        return str(materialize(checkpoint))
    except Exception as exc:  # unknown names (ValueError), unbuildable architectures (TinyBuildError), anything else
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointLoadError(f"the tiny builder failed: {text}") from None


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class ModelCache:
    """Each target is loaded at most once per session; failures are remembered too."""

    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    loaded: dict[Target, CausalLM | CheckpointLoadError] = field(default_factory=dict)
    load_count: int = 0
    peak_held: int = 0  # most models held at once: with release after the last test, 1 for a serial run

    def get(self, target: Target) -> CausalLM:
        if target not in self.loaded:
            self.load_count += 1
            try:
                self.loaded[target] = load(target, seed=self.seed, atol=self.atol, rtol=self.rtol)
            except CheckpointLoadError as exc:
                self.loaded[target] = exc
            self.peak_held = max(self.peak_held, sum(isinstance(e, CausalLM) for e in self.loaded.values()))
        entry = self.loaded[target]
        if isinstance(entry, CheckpointLoadError):
            raise entry
        return entry

    def release(self, target: Target) -> None:
        """Forget a loaded model so its memory can be freed once no fixture holds it."""
        entry = self.loaded.pop(target, None)
        if isinstance(entry, CausalLM):
            import gc

            import torch

            del entry
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
