"""Checks of a request's parameters against an engine, with messages for the person who sent it.

The same checks serve ``semvoc-run``, the Python API and any server built on
:class:`semvoc.runtime.Pipeline`: each failure is a :class:`RequestError` that names the
parameter (``steps``, ``vocoder_steps``, ``guidance``, ``duration``, ``seed``), the value and
what would be accepted. A front end shows ``err.name`` its own way (``--steps`` on the command
line, a JSON field in a server) and ``err.problem`` as it is.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from semvoc.runtime.manifest import Manifest

#: seeds are 64-bit unsigned integers (numpy's SeedSequence takes any non-negative int; a bound
#: keeps seeds portable across front ends and JSON)
SEED_LIMIT = 2**64
#: the CFG scale: 1 = no guidance, the official default is 3.5; far larger values only drive the
#: latent towards infinity
GUIDANCE_RANGE = (0.0, 100.0)


class RequestError(ValueError):
    """A request parameter the engine cannot serve: ``name``, ``value`` and ``problem`` (user-facing)."""

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{name} {value!r}: {problem}")

    def for_option(self, option: str | None = None) -> str:
        """The message with the parameter as a command-line option (``--vocoder-steps 0: ...``)."""
        flag = option or "--" + self.name.replace("_", "-")
        return f"{flag} {_show(self.value)}: {self.problem}"


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestError(name, value, "must be a whole number")
    return int(value)


def check_steps(manifest: Manifest, value, *, vocoder: bool = False) -> int:
    """A DiT (or vocoder) step count: the engine's default when ``value`` is None."""
    name = "vocoder_steps" if vocoder else "steps"
    defaults, buckets = manifest.defaults, manifest.buckets
    limit = int(buckets["max_vocoder_steps" if vocoder else "max_dit_steps"])
    if value is None:
        steps = int(defaults[name])
        if steps > limit:  # an engine exported with smaller tables than its default needs
            raise RequestError(name, steps, f"is the engine's default, but its tables hold at most {limit} steps: "
                                            f"give 1..{limit}, or re-export the engine with a larger "
                                            f"--max-{'vocoder-' if vocoder else ''}steps")
        return steps
    steps = _integer(name, value)
    if steps < 1:
        raise RequestError(name, steps, f"must be at least 1 (the engine's default is {defaults[name]})")
    if steps > limit:
        flag = "--max-vocoder-steps" if vocoder else "--max-steps"
        raise RequestError(name, steps, f"this engine's tables hold at most {limit} steps; use 1..{limit}, "
                                        f"or re-export the engine with semvoc-export {flag} {steps}")
    return steps


def check_guidance(manifest: Manifest, value) -> float:
    if value is None:
        return float(manifest.defaults["guidance"])
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError("guidance", value, "must be a number")
    low, high = GUIDANCE_RANGE
    guidance = float(value)
    if not math.isfinite(guidance) or not low <= guidance <= high:
        raise RequestError("guidance", guidance, f"must be a finite number from {low:g} to {high:g} "
                                                 f"(1 = no guidance; the engine's default is "
                                                 f"{manifest.defaults['guidance']:g})")
    return guidance


def check_duration(manifest: Manifest, value) -> float:
    """One of the engine's exported duration buckets (seconds); the first when ``value`` is None."""
    durations = [float(d) for d in manifest.buckets["durations_s"]]
    if value is None:
        return durations[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError("duration", value, "must be a number of seconds")
    for d in durations:
        if abs(d - float(value)) < 1e-6:
            return d
    have = ", ".join(f"{d:g}" for d in durations)
    raise RequestError("duration", float(value), f"is not an exported bucket; this engine has {have} s "
                                                 "(re-export with semvoc-export --durations for others)")


def check_seed(value) -> int:
    seed = _integer("seed", value)
    if not 0 <= seed < SEED_LIMIT:
        raise RequestError("seed", seed, "must be from 0 to 2**64 - 1")
    return seed


@dataclass(frozen=True)
class Request:
    """A checked request, every parameter resolved against the engine's defaults."""

    seed: int
    steps: int | None  # None for resynthesis (no DiT)
    vocoder_steps: int
    guidance: float | None  # None for resynthesis
    duration: float


def check_request(manifest: Manifest, *, seed=0, steps=None, vocoder_steps=None, guidance=None,
                  duration=None, text: bool = True) -> Request:
    """Every parameter of a request checked against ``manifest``; raises :class:`RequestError`.
    ``text=False`` checks a resynthesis request, which has no DiT steps and no guidance."""
    return Request(seed=check_seed(seed), steps=check_steps(manifest, steps) if text else None,
                   vocoder_steps=check_steps(manifest, vocoder_steps, vocoder=True),
                   guidance=check_guidance(manifest, guidance) if text else None,
                   duration=check_duration(manifest, duration))
