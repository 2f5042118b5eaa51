"""One table of per-dtype tolerances, used by every check.

Values follow what transformers' own tests accept between two correct code
paths (eager vs SDPA, cached vs uncached), loosened a little because the
suite also runs on real pretrained models whose logits reach 20-30.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TOLERANCES", "Tolerance", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """Elementwise closeness: ``|actual - expected| <= atol + rtol * |expected|``.

    ``atol`` may be raised to a multiple of the target's measured noise floor
    (``noise``; see precision.py), which failures then report.
    """

    atol: float
    rtol: float
    noise: float | None = None
    noise_source: str = ""

    def bound(self, expected: float) -> float:
        """The allowed difference around one expected value."""
        return self.atol + self.rtol * abs(expected)

    def as_dict(self) -> dict[str, float | str | None]:
        """Numbers for machine-read reports."""
        return {"atol": self.atol, "rtol": self.rtol, "noise": self.noise, "noise_source": self.noise_source or None}

    def __str__(self) -> str:
        text = f"atol={self.atol:.3g}, rtol={self.rtol:g}"
        return f"{text} ({self.noise_source})" if self.noise is not None else text


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=2e-2),
}


def tolerance_for(dtype: object, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The table entry for ``dtype`` (a torch dtype or its name), with overrides applied.

    Unknown dtypes (float64, quantised storage) fall back to the float32 entry.
    """
    name = str(dtype).removeprefix("torch.")
    base = DEFAULT_TOLERANCES.get(name, DEFAULT_TOLERANCES["float32"])
    return Tolerance(atol=base.atol if atol is None else atol, rtol=base.rtol if rtol is None else rtol)
