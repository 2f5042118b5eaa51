"""Resolved plugin settings: command-line option > environment variable > ini key > default.

Every value remembers where it came from so the report header can show it.
Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

__all__ = ["DTYPE_CHOICES", "OPTIONS", "OptionSpec", "Setting", "Settings", "resolve_settings"]

DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
SUITE_CHOICES = ("on", "off", "only")
SNAPSHOT_MISSING_CHOICES = ("fail", "write")
BENCHMARK_MODES = ("no_cache", "dynamic", "static", "static_compiled")  # the generation benchmark's modes
HOW_TO_CONFIGURE = (
    "pass --causal-lm-checkpoint=CKPT (e.g. tiny:qwen3), "
    "set CAUSAL_LM_CHECKPOINT, or add causal_lm_checkpoint to [tool.pytest.ini_options]"
)
MAIN_SETTINGS = ("checkpoint", "device", "dtype", "suite")  # always in the report header
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_float(text: str) -> float:
    return float(text)


def _parse_max_memory(text: str) -> str:
    from .loading import parse_max_memory

    parse_max_memory(text)  # raises ValueError naming the bad entry
    return text


def _parse_int(text: str) -> int:
    return int(text)


@dataclass(frozen=True)
class OptionSpec:
    """One setting: its option, environment variable, ini key, default and help."""

    name: str
    help: str
    default: Any
    multiple: bool = False
    flag: bool = False
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    path: str | None = None  # "input" (used where it exists) or "output" (always): anchored like pytest's paths

    @property
    def option(self) -> str:
        return "--causal-lm-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "causal_lm_" + self.name

    @property
    def env(self) -> str:
        return "CAUSAL_LM_" + self.name.upper()

    @property
    def ini(self) -> str:
        return "causal_lm_" + self.name

    @property
    def ini_type(self) -> str:
        if self.multiple:
            return "linelist"
        return "bool" if self.flag else "string"


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "checkpoint",
        "Hub id, local directory, .gguf file or built-in tiny checkpoint (tiny:qwen3, tiny:llama) "
        "to test; repeat to test several. Default: none (fixtures skip, built-in suite not collected).",
        default=(),
        multiple=True,
        metavar="CKPT",
        path="input",
    ),
    OptionSpec("revision", "Hub revision (branch, tag or commit). Default: the Hub's default branch.", None),
    OptionSpec(
        "device",
        "Device to test on: auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps; repeat to test "
        "several. A device named here that this machine lacks is a usage error; only auto falls back. Default: auto.",
        default=("auto",),
        multiple=True,
    ),
    OptionSpec(
        "device_map",
        "Spread each model over the available devices with accelerate, as from_pretrained(device_map=...) "
        "does for checkpoints larger than one GPU (e.g. auto). Replaces --causal-lm-device. Default: none.",
        None,
    ),
    OptionSpec(
        "dtype",
        "Weights dtype: float32, bfloat16, float16, or auto (the checkpoint's own). Default: float32.",
        default="float32",
        choices=DTYPE_CHOICES,
    ),
    OptionSpec(
        "trust_remote_code",
        "Allow checkpoints to run their own modeling code. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "attn_implementation",
        "Attention implementation passed to from_pretrained (eager, sdpa, ...). Default: transformers' choice.",
        None,
    ),
    OptionSpec(
        "suite",
        "Collect the built-in invariant suite when a checkpoint is configured: on (besides your tests), "
        "off (fixtures only, for your own tests) or only (the suite alone). Default: on.",
        default="on",
        choices=SUITE_CHOICES,
    ),
    OptionSpec(
        "require_checkpoint",
        "A session with no checkpoint configured is a usage error instead of skipped fixtures: for CI jobs "
        "that must test something. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "known_limitations",
        "Invariants (keys such as padding_invariance) this project acknowledges its checkpoint fails: they run as "
        "strict xfail, so the verdict says 'lim' and a fix shows as XPASS. Repeat or comma-separate. Default: none.",
        default=(),
        multiple=True,
        metavar="KEY",
    ),
    OptionSpec(
        "compile",
        "Also run static-cache generation under torch.compile and compare it with a forward pass (the "
        "static_cache invariant). Opt-in: compiling costs 10-20 s even for a tiny model on CPU. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "tensor_parallel",
        "Also load each checkpoint sharded over N processes with transformers' tensor-parallel plan (tp_plan='auto' "
        "under torchrun: gloo on CPU, nccl on GPUs) and compare it with the single-process model (the "
        "tensor_parallel invariant). Default: off.",
        None,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec(
        "offload_parity",
        "Also load each checkpoint with accelerate's device_map='auto' under a max_memory that sends most layers to "
        "disk, and compare it with the session's model (the device_map_parity invariant; it runs without this flag "
        "when --causal-lm-device-map is set, against a one-device load). Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "max_memory",
        "With --causal-lm-device-map: accelerate's max_memory per device, e.g. cpu=2GB or 0=20GiB,cpu=60GiB; "
        "what does not fit is offloaded to a temporary folder on disk. Default: none (accelerate decides).",
        None,
        parse=_parse_max_memory,
        metavar="DEVICE=SIZE,...",
    ),
    OptionSpec(
        "random_weights",
        "The checkpoints have random weights on purpose (test fixtures): skip the invariants that need a trained "
        "model (knows_language), saying so in the verdict. tiny: checkpoints always count as random. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "long_context_tokens",
        "Longest sequence the long-context invariant builds to cross the config's boundaries (sliding window, "
        "attention chunk, RoPE original context). Default: 4096 on CPU, 32768 on an accelerator.",
        None,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec(
        "long_prefill_tokens",
        "Length of the long-prefill invariant's prompt (one forward against the same prompt fed through the cache "
        "in chunks, and against its prefixes), capped by max_position_embeddings; 0 turns it off. Default: 1024 on "
        "CPU for models up to 10M parameters (off for larger ones: about 8 s for 135M), 4096 on an accelerator.",
        None,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec(
        "equivalence_examples",
        "Turn on the equivalent-paths invariant: draw N cases of batch size, lengths, padding side, cache "
        "chunks, packing and attention implementation, each row compared with the row alone; a failing case is "
        "shrunk to the smallest one (hypothesis, seeded; pip install 'pytest-causal-lm[equivalence]'). 100 cases: "
        "about 10 s on a tiny model; about 1 s per case on a 135M model in float32 on CPU. Default: 0 (off).",
        default=0,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec("atol", "Absolute tolerance for every dtype. Default: per-dtype table.", None, parse=_parse_float),
    OptionSpec("rtol", "Relative tolerance for every dtype. Default: per-dtype table.", None, parse=_parse_float),
    OptionSpec("seed", "Seed for random test inputs. Default: 0.", default=0, parse=_parse_int),
    OptionSpec(
        "snapshot_dir",
        "Directory for behaviour snapshots (syrupy). Setting it (or passing "
        "--snapshot-update) turns the built-in snapshot test on. Default: causal_lm_snapshots in the rootdir.",
        None,
        metavar="DIR",
        path="output",
    ),
    OptionSpec(
        "snapshot_missing",
        "What the snapshot test does for a target with no snapshot yet: fail (CI: every snapshot is reviewed "
        "before it is trusted) or write (record it and skip; the next run compares). Default: fail.",
        default="fail",
        choices=SNAPSHOT_MISSING_CHOICES,
    ),
    OptionSpec(
        "report",
        "Also write the verdict table to PATH: .md (Markdown, for CI job summaries) or .json. Default: none.",
        None,
        metavar="PATH",
        path="output",
    ),
    OptionSpec(
        "github_summary",
        "Append the Markdown verdict to $GITHUB_STEP_SUMMARY when that variable is set. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "reference",
        "Reference checkpoint: every checkpoint is compared with it (KL divergence, top-k agreement, greedy "
        "agreement, perplexity) on the same device. Default: none (the reference test skips).",
        None,
        metavar="CKPT",
        path="input",
    ),
    OptionSpec(
        "reference_dtype",
        "dtype the reference is loaded in. Default: float32.",
        "float32",
        choices=DTYPE_CHOICES,
    ),
    OptionSpec(
        "reference_prompts",
        "File of prompts for the reference comparison: one per line, or a .json list. Default: 24 built-in prompts.",
        None,
        metavar="FILE",
        path="input",
    ),
    OptionSpec(
        "reference_max_kl_mean",
        "Largest mean KL(reference || candidate) in nats. Default: 0.01.",
        0.01,
        parse=_parse_float,
    ),
    OptionSpec("reference_max_kl_p99", "Largest 99th-percentile KL in nats. Default: 0.1.", 0.1, parse=_parse_float),
    OptionSpec(
        "reference_max_kl_p999",
        "Largest 99.9th-percentile KL in nats: the tail, where a conversion broken at a few positions shows. "
        "Default: 0.5.",
        0.5,
        parse=_parse_float,
    ),
    OptionSpec("reference_min_top1", "Smallest top-1 agreement rate. Default: 0.9.", 0.9, parse=_parse_float),
    OptionSpec(
        "reference_max_perplexity_delta", "Largest relative perplexity change. Default: 0.05.", 0.05, parse=_parse_float
    ),
    OptionSpec(
        "benchmark",
        "Run the generation benchmarks (pytest-benchmark); otherwise they skip. "
        "--benchmark-only also turns them on. Default: off.",
        default=False,
        flag=True,
        parse=_parse_bool,
    ),
    OptionSpec(
        "benchmark_modes",
        "Generation modes to time: no_cache, dynamic, static, static_compiled; repeat or comma-separate. "
        "Default: no_cache,dynamic,static on CPU (compiling costs tens of seconds), all four on an accelerator.",
        default=(),
        multiple=True,
        choices=BENCHMARK_MODES,
        metavar="MODE",
    ),
    OptionSpec(
        "benchmark_new_tokens",
        "New-token counts of the sweep (at the first prompt length); repeat or comma-separate. Default: 8,32,128.",
        default=(8, 32, 128),
        multiple=True,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec(
        "benchmark_prompt_lengths",
        "Prompt lengths of the sweep, in tokens (the later ones at the middle new-token count); repeat or "
        "comma-separate. Default: 32,512 on CPU, 32,1024,8192 on an accelerator (capped by the model).",
        default=(),
        multiple=True,
        parse=_parse_int,
        metavar="N",
    ),
    OptionSpec("benchmark_batch_size", "Sequences per generate call. Default: 1.", 1, parse=_parse_int),
    OptionSpec("benchmark_rounds", "Timed rounds per cell. Default: 5.", 5, parse=_parse_int),
    OptionSpec(
        "benchmark_warmup_rounds",
        "Untimed rounds before them (one more for static_compiled, whose first calls compile). Default: 1.",
        1,
        parse=_parse_int,
    ),
    OptionSpec(
        "benchmark_plot",
        "Where the benchmark's PNG goes (tokens/s vs new tokens and vs prompt length per mode). "
        "Default: causal_lm_benchmark.png in the rootdir.",
        "causal_lm_benchmark.png",
        metavar="PATH",
        path="output",
    ),
    OptionSpec(
        "peak_bandwidth",
        "Peak memory bandwidth of the device in GB/s, for the benchmark's memory-bandwidth utilisation and "
        "diagnosis. Default: a table of known GPUs, else a measured large copy.",
        None,
        parse=_parse_float,
        metavar="GBPS",
    ),
)


@dataclass(frozen=True)
class Setting:
    """A resolved value and where it came from (option, env, ini or default)."""

    value: Any
    source: str


@dataclass(frozen=True)
class Settings:
    """All resolved settings of a session."""

    values: dict[str, Setting]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name].value
        except KeyError:
            raise AttributeError(name) from None

    def reference_thresholds(self) -> dict[str, float]:
        """The reference comparison's limits, by statistic."""
        return {
            "kl_mean": self.reference_max_kl_mean,
            "kl_p99": self.reference_max_kl_p99,
            "kl_p999": self.reference_max_kl_p999,
            "top1_agreement": self.reference_min_top1,
            "perplexity_delta": self.reference_max_perplexity_delta,
        }

    def describe(self, everything: bool = True) -> list[str]:
        """``name=value (source)`` per setting; without ``everything``, only the main ones and those not default."""
        parts = []
        for name, setting in self.values.items():
            if not everything and setting.source == "default" and name not in MAIN_SETTINGS:
                continue
            value = setting.value
            shown = (",".join(map(str, value)) or "none") if isinstance(value, (tuple, list)) else value
            parts.append(f"{name}={shown} ({setting.source})")
        return parts


def _from_text(spec: OptionSpec, text: str, source: str) -> Any:
    if spec.multiple:
        return tuple(_parsed(spec, part.strip(), source) for part in text.split(",") if part.strip())
    return _parsed(spec, text, source)


def _parsed(spec: OptionSpec, text: Any, source: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return spec.parse(text)
    except ValueError as exc:
        raise pytest.UsageError(f"{source}: invalid value for {spec.name}: {exc}") from None


def _resolve_one(spec: OptionSpec, config: pytest.Config, environ: dict[str, str]) -> Setting:
    option_value = config.getoption(spec.dest, default=None)
    if spec.flag and option_value is False:
        option_value = None  # store_true leaves False when the flag is absent
    if option_value not in (None, []):
        if spec.multiple:
            parts = [part.strip() for value in option_value for part in str(value).split(",") if part.strip()]
            if not parts:  # "--causal-lm-checkpoint=" would otherwise select nothing and exit silently
                example = f"{spec.option}={spec.default[0] if spec.default else 'tiny:qwen3'}"
                raise pytest.UsageError(f"{spec.option}: empty value; pass one, e.g. {example}")
            return Setting(tuple(_parsed(spec, part, spec.option) for part in parts), "option")
        return Setting(_parsed(spec, option_value, spec.option), "option")
    if environ.get(spec.env, "").strip():
        return Setting(_from_text(spec, environ[spec.env], f"environment variable {spec.env}"), "env")
    ini_value = config.getini(spec.ini)
    if spec.multiple and ini_value:
        return Setting(tuple(_parsed(spec, v.strip(), f"ini key {spec.ini}") for v in ini_value if v.strip()), "ini")
    if spec.flag and ini_value is True:
        return Setting(True, "ini")
    if not spec.multiple and not spec.flag and ini_value not in (None, ""):
        return Setting(_from_text(spec, str(ini_value), f"ini key {spec.ini}"), "ini")
    return Setting(spec.default, "default")


def _validate(spec: OptionSpec, setting: Setting) -> None:
    values = setting.value if spec.multiple else (setting.value,)
    for value in values:
        if spec.choices and value not in spec.choices:
            raise pytest.UsageError(
                f"{spec.option}: invalid choice {value!r} (from {setting.source}); "
                f"choose from {', '.join(spec.choices)}"
            )
        if spec.name == "device" and not _DEVICE_PATTERN.match(value):
            raise pytest.UsageError(
                f"{spec.option}: invalid device {value!r} (from {setting.source}); "
                "choose from auto, cpu, cuda, cuda:N, mps"
            )


# Variables with the prefix that are not settings: where tiny: checkpoints are built, and CAUSAL_LM_TEST_*,
# left to test code (this project's own tests use it).
OTHER_ENV = ("CAUSAL_LM_TINY_DIR",)
TEST_ENV_PREFIX = "CAUSAL_LM_TEST_"


def check_names(ini_keys: Iterable[str], environ: Mapping[str, str]) -> None:
    """An unknown ``causal_lm_*`` ini key or ``CAUSAL_LM_*`` variable is a usage error: a typo must not turn
    the suite off and leave a run green having tested nothing."""
    known_ini = [spec.ini for spec in OPTIONS]
    for key in sorted(k for k in ini_keys if k.startswith("causal_lm_") and k not in known_ini):
        raise pytest.UsageError(f"ini key {key}: no such pytest-causal-lm setting{closest(key, known_ini)}")
    known_env = [spec.env for spec in OPTIONS] + list(OTHER_ENV)
    for name in sorted(n for n in environ if n.startswith("CAUSAL_LM_") and n not in known_env):
        if not name.startswith(TEST_ENV_PREFIX):
            raise pytest.UsageError(
                f"environment variable {name}: no such pytest-causal-lm setting{closest(name, known_env)}"
            )


def closest(name: str, known: list[str], otherwise: str = "; pytest --help lists them (causal-lm group)") -> str:
    """``"; did you mean X?"`` for the known name nearest to a misspelt one, else ``otherwise``."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else otherwise


def _ini_keys(config: pytest.Config) -> Iterable[str]:
    """The keys of the ini file, known or not (pytest 9 deprecates ``config.inicfg`` for this)."""
    keys = getattr(config, "_inicfg", None)
    return list(keys if keys is not None else config.inicfg)


def _anchored(spec: OptionSpec, setting: Setting, base: Path) -> Setting:
    """A relative path as pytest anchors its own: from an ini file, at the file's directory; from the command
    line or environment, at the directory pytest ran in. An input path is anchored only where it exists (else
    it may be a Hub id); an output path always."""
    if spec.path is None or setting.value is None or (spec.path == "input" and setting.source != "ini"):
        return setting

    def anchor(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith("tiny:"):
            return value
        path = base / Path(value).expanduser()  # an absolute value stays as it is
        return str(path) if spec.path == "output" or path.exists() else value

    value = tuple(anchor(v) for v in setting.value) if spec.multiple else anchor(setting.value)
    return replace(setting, value=value)


def resolve_settings(config: pytest.Config, environ: dict[str, str] | None = None) -> Settings:
    """Resolve every setting; raises ``pytest.UsageError`` on an invalid value or an unknown name."""
    environ = dict(os.environ if environ is None else environ)
    check_names(_ini_keys(config), environ)
    here = Path(config.invocation_params.dir)
    bases = {"option": here, "env": here, "ini": config.inipath.parent if config.inipath else config.rootpath}
    values = {}
    for spec in OPTIONS:
        setting = _resolve_one(spec, config, environ)
        _validate(spec, setting)
        values[spec.name] = _anchored(spec, setting, bases.get(setting.source, config.rootpath))
    return Settings(values)
