"""Settings of registered defenses and attacks: dataclass fields that generate their own command-line flags.

A defense or an attack is one file: a frozen dataclass whose ``option(...)`` fields are its settings
(defaults, bounds and help in one place), registered by name in a ``Registry``. The command line
turns every option into a ``--NAME-FIELD`` flag, and ``counterattack defenses`` / ``counterattack
attacks`` list them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import numbers
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import Field, field, fields, is_dataclass
from typing import Any

from .errors import CounterattackError

PIXEL_UNIT = "1/255"  # an option in pixel units is given in 1/255 on the command line
PIXEL = 1 / 255  # that unit, in [0, 1] pixels
# A budget above a quarter of the pixel range is almost always a unit slip through the API (PGD(eps=1) meant 1/255, not
# the whole box): it gets a warning, not a refusal, since an unbounded sanity check means it.
LARGE_BUDGET = 0.25

log = logging.getLogger(__name__)
_LARGE_BUDGETS_MEANT: ContextVar[bool] = ContextVar("counterattack_large_budgets_meant", default=False)


@contextlib.contextmanager
def large_budgets_meant() -> Iterator[None]:
    """Inside the block, budgets above ``LARGE_BUDGET`` are deliberate and built without a warning: the command line's
    (given in 1/255, where no unit slip is possible) and a sanity sweep's unbounded eps."""
    token = _LARGE_BUDGETS_MEANT.set(True)
    try:
        yield
    finally:
        _LARGE_BUDGETS_MEANT.reset(token)


def option(default: Any, help: str, *, unit: str | None = None, low: float | None = 0, high: float | None = None,
           choices: Sequence[str] | None = None, aliases: Sequence[str] = ()) -> Any:
    """A setting: a dataclass field whose metadata generates its command-line flag.

    ``unit=PIXEL_UNIT`` marks a budget or step size: stored in [0, 1] pixel units, given in 1/255
    on the command line (and bounded by 255 there). ``aliases`` are older flag spellings.
    """
    if unit == PIXEL_UNIT and high is None:
        high = 1.0
    return field(default=default, metadata={"help": help, "unit": unit, "low": low, "high": high, "choices": choices,
                                            "aliases": tuple(aliases), "cli": True})


def flag(name: str, setting: str) -> str:
    """The command-line flag of a registered class's option: ``--NAME-SETTING``."""
    return f"--{name}-{setting.replace('_', '-')}"


def runtime(default: Any = None) -> Any:
    """A field set by code, not from the command line (an encoder, a list of transforms)."""
    return field(default=default, compare=False, repr=False, metadata={"cli": False})


def options_of(cls: type) -> list[Field]:
    """The command-line settings of a registered class, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("cli")]


def defaults_of(cls: type) -> dict[str, Any]:
    """A registered class's options at their defaults, read off its fields (nothing is constructed)."""
    return {f.name: f.default for f in options_of(cls)}


def describe_options(instance: Any) -> dict:
    """``{"defense": name, option: value, ...}`` (or ``"attack"``), as results record a registered instance."""
    return {instance.registry_kind: instance.name,
            **{f.name: getattr(instance, f.name) for f in options_of(type(instance))}}


def check_options(instance: Any) -> None:
    """Refuse values outside an option's bounds or choices, or not finite, with the option's name; warn (one line) of
    pixel budgets above ``LARGE_BUDGET``, outside ``large_budgets_meant()``."""
    large = []
    for f in options_of(type(instance)):
        value, meta = getattr(instance, f.name), f.metadata
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise CounterattackError(f"{instance.name}: {f.name} must be one of {', '.join(meta['choices'])}, "
                                         f"got {value!r}.")
            continue
        if _is_count(f.default) and not _is_count(value):
            raise CounterattackError(f"{instance.name}: {f.name} must be an integer, got {value!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) and not (math.isinf(value) and value > 0 and meta["high"] is None):
            raise CounterattackError(f"{instance.name}: {f.name} must be a finite number, got {value}.")
        if meta["low"] is not None and value < meta["low"]:
            raise CounterattackError(f"{instance.name}: {f.name} must be >= {meta['low']:g}, got {value:g}.")
        if meta["high"] is not None and value > meta["high"]:
            raise CounterattackError(f"{instance.name}: {f.name} must be <= {meta['high']:g}, got {value:g}.")
        if meta["unit"] == PIXEL_UNIT and value > LARGE_BUDGET:
            large.append(f"{f.name}={value:g} ({value / PIXEL:g}/255)")
    if large and not _LARGE_BUDGETS_MEANT.get():
        log.warning("%s: %s: above a quarter of the pixel range; budgets are in [0, 1] pixel units, so 4/255 is "
                    "written 4 / 255", instance.name, " and ".join(large))


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_on_construction(cls: type) -> None:
    """Wrap ``cls.__init__`` so that every instance's options are checked when it is built (``PGD(steps=1.5)`` fails
    there, not when called): registration does it, so an extension need not remember to."""
    init = cls.__init__
    if getattr(init, "_checks_options", False):
        return

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        check_options(self)

    checked_init._checks_options = True
    cls.__init__ = checked_init


class RegistrationError(CounterattackError):
    """An extension that does not follow its protocol: refused when its module is imported, in one line."""


class Registry(dict):
    """Registered classes of one kind ("defense" or "attack") by name, in registration order.

    ``required``: the methods the kind's protocol calls, checked at registration, so a broken
    extension fails when it is imported, not hours into a run; ``declared``: class attributes it must
    declare, each with one of the values given (an attack's ``norm``); ``defaults``: class attributes an
    extension may leave out (a defense without a gate).
    """

    def __init__(self, kind: str, required: Sequence[str] = (), defaults: Mapping[str, Any] | None = None,
                 guard: Callable[[type], None] | None = None, declared: Mapping[str, Sequence[Any]] | None = None):
        super().__init__()
        self.kind = kind
        self.required = tuple(required)
        self.declared = dict(declared or {})
        self.defaults = dict(defaults or {})
        self.guard = guard  # wraps the entry points in the kind's input check (``inputs``)
        self.first: tuple[str, ...] = ()

    def register(self, cls: type) -> type:
        """Register ``cls`` under its module's name, ``_`` written ``-``: one file is one defense (or attack)."""
        name = cls.__module__.rsplit(".", 1)[-1].replace("_", "-")
        if name in self and self[name] is not cls:
            raise RegistrationError(f"two {self.kind}s are named {name!r}: {self[name].__module__} and "
                                    f"{cls.__module__}")
        missing = [method for method in self.required if not callable(getattr(cls, method, None))
                   or (method == "__call__" and cls.__call__ is object.__call__)]
        if missing:
            raise RegistrationError(f"{self.kind} {name} ({cls.__module__}) lacks {', '.join(missing)}: a {self.kind} "
                                    f"needs {', '.join(self.required)}.")
        for attribute, allowed in self.declared.items():
            if getattr(cls, attribute, None) not in allowed:
                found = f"declares {getattr(cls, attribute)!r}" if hasattr(cls, attribute) else "does not declare it"
                raise RegistrationError(f"{self.kind} {name} ({cls.__module__}) must declare {attribute} as one of "
                                        f"{', '.join(map(repr, allowed))}; it {found}.")
        if not is_dataclass(cls):
            raise RegistrationError(f"{self.kind} {name} ({cls.__module__}) is not a dataclass: its options are "
                                    "dataclass fields made with option(...).")
        for attribute, value in self.defaults.items():
            if not hasattr(cls, attribute):
                setattr(cls, attribute, value)
        if self.guard is not None:
            self.guard(cls)
        _checked_on_construction(cls)
        cls.name = name
        cls.registry_kind = self.kind
        self[name] = cls
        return cls

    def discover(self, package: str, path: Iterable[str], first: Sequence[str] = ()) -> None:
        """Import every module on a package's ``path``, registering what they define, and list them in
        the order of ``first`` (module names; kept for later discoveries), then alphabetically."""
        first = self.first = tuple(first) or self.first
        modules = sorted((m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_")),
                         key=lambda n: (n not in first, first.index(n) if n in first else 0, n))
        for module in modules:
            importlib.import_module(f"{package}.{module}")
        order = [m.replace("_", "-") for m in modules]
        registered = sorted(self.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        self.clear()
        self.update(registered)

    def summary(self, name: str) -> str:
        """The first line of a registered class's docstring: what listings and help show."""
        return (self[name].__doc__ or "").strip().splitlines()[0]

    def check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self]
        if unknown:
            raise CounterattackError(f"Unknown {self.kind}(s) {', '.join(map(repr, unknown))}. "
                                     f"Available: {', '.join(self)}.")
        if len(set(names)) != len(names):
            raise CounterattackError(f"{self.kind.capitalize()} listed twice: {', '.join(names)}.")

    def build(self, name: str, **settings: Any) -> Any:
        """A registered instance with some settings changed (budgets in [0, 1] pixel units)."""
        self.check_names([name])
        cls = self[name]
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise CounterattackError(f"{name} has no setting {', '.join(unknown)}; its settings: "
                                     f"{', '.join(f.name for f in options_of(cls)) or 'none'}.")
        return cls(**settings)

    def rebuild(self, described: Mapping[str, Any]) -> Any:
        """The instance a record describes (``describe()``'s output: its name and options), or None where this
        installation lacks it or the recorded options no longer fit it."""
        cls = self.get(described.get(self.kind)) if isinstance(described, Mapping) else None
        if cls is None:
            return None
        own = {f.name for f in options_of(cls)}
        try:
            with large_budgets_meant():  # what a run recorded was meant
                return cls(**{k: v for k, v in described.items() if k in own})
        except (CounterattackError, TypeError, ValueError):
            return None

    def build_many(self, names: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None = None,
                   **shared: Any) -> list:
        """Instances by name. ``settings[name]`` changes one instance's settings; a ``shared`` setting goes to
        every class that has a field of that name, and an instance's own setting wins over it."""
        self.check_names(names)
        settings = settings or {}
        built = []
        for name in names:
            own = {f.name for f in fields(self[name])}
            given = {k: v for k, v in shared.items() if k in own and v is not None}
            built.append(self.build(name, **{**given, **settings.get(name, {})}))
        return built
