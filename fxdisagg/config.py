"""One frozen, validated configuration for the API, the passes, the runtimes and the dumps."""

from __future__ import annotations

import dataclasses
import os

from fxdisagg.errors import ConfigError

STRATEGIES = ("r", "contiguous", "zigzag")
LAUNCHES = ("inprocess", "spawn", "torchrun")
KERNELS = ("", "torch", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class Config:
    """What `fxdisagg.compile` was asked for.

    alpha: CompNodes; beta: the AttnNode grid is beta x beta; tp: ranks per CompNode
    (tensor parallel; 1 for now); sharding: token placement ("r", "contiguous", "zigzag");
    launch: runtime ("spawn", "torchrun", "inprocess"); kernel: attention backend ("" picks
    by device); max_len: largest sequence length of the capture (None: the model config's);
    timeout: seconds a worker may make no progress; dump_dir: where dumps go (None: off);
    cache_size: per-length Plans and schedules kept, least recently used first out;
    max_cache_len: most tokens (prompt and generated) one KV cache holds (None: max_len);
    verify: compare every layer with the unmodified model on the first call of each capture
    (True: tolerance by dtype; a float: that relative tolerance; `fxdisagg.verify`);
    token_local: modules the user declares token-local (module paths, ``*`` globs allowed,
    or class names): `partition` runs their ops on CompNodes without proving locality.
    """

    alpha: int = 1
    beta: int = 1
    tp: int = 1
    sharding: str = "r"
    launch: str = "spawn"
    kernel: str = ""
    max_len: int | None = None
    timeout: float = 300.0
    dump_dir: str | None = None
    cache_size: int = 32
    max_cache_len: int | None = None
    verify: bool | float = False
    token_local: tuple[str, ...] = ()

    def __post_init__(self):
        validate_degrees(self.alpha, self.beta, self.tp)
        _choice("sharding", self.sharding, STRATEGIES)
        _choice("launch", self.launch, LAUNCHES)
        _choice("kernel", self.kernel, KERNELS)
        for name in ("timeout", "cache_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_len", "max_cache_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.token_local, tuple) and all(isinstance(m, str) for m in self.token_local)):
            raise ConfigError(f"token_local must be module paths or class names (strings), got "
                              f"{self.token_local!r}")
        if not (isinstance(self.verify, bool) or (isinstance(self.verify, float) and self.verify > 0)):
            raise ConfigError(f"verify must be True, False or a relative tolerance > 0 "
                              f"(a float), got {self.verify!r}")

    @property
    def world(self) -> int:
        return self.alpha * self.tp + self.beta ** 2

    @staticmethod
    def of(alpha, beta, *, tp=1, sharding="r", launch=None, dump_dir=None, **options) -> "Config":
        """From `fxdisagg.compile`'s arguments; unknown options raise ConfigError."""
        known = {"max_len", "kernel", "timeout", "cache_size", "max_cache_len", "verify",
                 "token_local"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
        options["kernel"] = options.get("kernel") or ""   # None: chosen by device
        if isinstance(options.get("token_local"), (list, str)):
            tl = options["token_local"]
            options["token_local"] = (tl,) if isinstance(tl, str) else tuple(tl)
        dump_dir = dump_dir or os.environ.get("FXDISAGG_DUMP_DIR")
        return Config(alpha, beta, tp, sharding, launch or default_launch(),
                      dump_dir=str(dump_dir) if dump_dir else None, **options)


def default_launch() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return "torchrun"
    return "spawn"


def validate_degrees(alpha, beta, tp=1) -> None:
    for name, v in (("alpha", alpha), ("beta", beta), ("tp", tp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")


def _choice(name, value, allowed) -> None:
    if value not in allowed:
        shown = tuple(a for a in allowed if a)
        raise ConfigError(f"{name}={value!r}; choose one of {shown}")
