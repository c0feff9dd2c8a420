"""Traffic rules: how a model's unversioned requests are shared between its versions, as text.

One grammar serves ``SERVING_TRAFFIC`` and the admin API (``POST
/v2/repository/models/{name}/traffic`` with ``{"rule": "..."}``)::

    rules   := NAME ":" rule (";" NAME ":" rule)*        (the setting; the API takes one rule)
    rule    := item ("," item)*
    item    := VERSION [PERCENT "%"]                       a share of the requests
             | VERSION "shadow" [PERCENT "%"]              a copy of PERCENT% of them (default 100)
             | "sticky" HEADER                             the same header value, the same version
    VERSION := ["v"] DIGITS

The first version listed is the stable one: the others are candidates, judged against it and
rolled back to it. Percentages add up to 100; one version listed without a percentage takes what
the others leave (``v1, v2 10%`` is ``v1 90%, v2 10%``). A rolled-back candidate stays in the rule
at 0% (a shadow at ``shadow 0%``), so the rule still says what happened.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from dataclasses import dataclass, replace

from serving.errors import ConfigError

Key = tuple[str, int]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_ITEM = re.compile(
    r"^(?:v?(?P<version>\d{1,9})(?:\s+(?P<shadow>shadow))?(?:\s+(?P<percent>\d{1,3}(?:\.\d{1,4})?)%)?"
    r"|sticky\s+(?P<header>\S+))$",
    re.IGNORECASE,
)
MAX_RULE_CHARS = 1024


@dataclass(frozen=True)
class TrafficRule:
    """One model's rule: the split (version, percent) with the stable version first, an optional
    shadow version with the percentage of requests it copies, and the sticky header (or "")."""

    name: str
    split: tuple[tuple[int, float], ...]
    shadow: int | None = None
    shadow_percent: float = 0.0
    sticky: str = ""

    @property
    def stable(self) -> int:
        return self.split[0][0]

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version the rule names: the split's, then the shadow."""
        split = tuple(version for version, _ in self.split)
        return split if self.shadow is None else (*split, self.shadow)

    def weight(self, version: int) -> float:
        """The percentage of requests ``version`` answers (0 for a shadow or an absent version)."""
        return next((percent for v, percent in self.split if v == version), 0.0)

    def candidates(self) -> list[int]:
        """The versions judged against the stable one: weighted above 0%, and a live shadow."""
        found = [v for v, percent in self.split[1:] if percent > 0]
        if self.shadow is not None and self.shadow_percent > 0:
            found.append(self.shadow)
        return found

    def rolled_back(self, version: int) -> TrafficRule:
        """The rule with ``version`` taken out of traffic: its share goes to the stable version,
        a shadow stops copying."""
        if version == self.shadow:
            return replace(self, shadow_percent=0.0)
        share = self.weight(version)
        split = tuple(
            (v, 0.0 if v == version else percent + share if v == self.stable else percent)
            for v, percent in self.split
        )
        return replace(self, split=split)

    def text(self) -> str:
        """The rule in the grammar it was parsed from (``v1 90%, v2 10%, v3 shadow 50%``)."""
        items = [f"v{version} {_percent(percent)}%" for version, percent in self.split]
        if self.shadow is not None:
            items.append(f"v{self.shadow} shadow {_percent(self.shadow_percent)}%")
        if self.sticky:
            items.append(f"sticky {self.sticky}")
        return ", ".join(items)

    def bounds(self) -> tuple[list[float], list[int]]:
        """Cumulative upper bounds in [0, 1) and the version each range picks (zero shares
        skipped)."""
        edges, versions, total = [], [], 0.0
        for version, percent in self.split:
            if percent > 0:
                total += percent / 100.0
                edges.append(total)
                versions.append(version)
        if not versions:  # every share rolled back to 0%: the stable version answers
            return [1.0], [self.stable]
        edges[-1] = 1.0  # rounding never leaves a draw without a version
        return edges, versions


def pick(bounds: tuple[list[float], list[int]], draw: float) -> int:
    """The version a draw in [0, 1) lands on."""
    edges, versions = bounds
    return versions[min(bisect_right(edges, draw), len(versions) - 1)]


def sticky_draw(name: str, value: str) -> float:
    """A header value's fixed draw in [0, 1), salted with the model's name.

    The stable version holds the lowest range and each candidate the one above it, so the same value
    always lands on the same version while the weights stay, and a candidate's values stay on it
    when its share grows.
    """
    digest = hashlib.blake2b(value.encode("utf-8", "replace"), digest_size=8, person=b"traffic")
    digest.update(name.encode())
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def parse_rule(name: str, text: str) -> TrafficRule:
    """One model's rule from its text; ConfigError says what is wrong and how to write it."""
    where = f"traffic rule for {name}"
    if not NAME.match(name):
        raise ConfigError(f"{where[:80]}: {name[:64]!r} is not a model name")
    if len(text) > MAX_RULE_CHARS:
        raise ConfigError(f"{where}: the rule is over {MAX_RULE_CHARS} characters")
    split: list[tuple[int, float | None]] = []
    shadow: tuple[int, float] | None = None
    sticky = ""
    for raw in (part.strip() for part in text.split(",")):
        match = _ITEM.match(raw)
        if not match:
            raise ConfigError(
                f"{where}: {raw[:40]!r} is not 'vN P%', 'vN shadow [P%]' or 'sticky HEADER';"
                " e.g. v1 90%, v2 10%"
            )
        if match["header"] is not None:
            if sticky or not HEADER.match(match["header"]):
                raise ConfigError(f"{where}: one sticky header, letters, digits and '-' only")
            sticky = match["header"]
            continue
        version = int(match["version"])
        percent = float(match["percent"]) if match["percent"] is not None else None
        if percent is not None and percent > 100:
            raise ConfigError(f"{where}: {percent:g}% is over 100%")
        if version in [v for v, _ in split] or (shadow and shadow[0] == version):
            raise ConfigError(f"{where}: version {version} is listed twice")
        if match["shadow"]:
            if shadow is not None:
                raise ConfigError(f"{where}: one shadow version per model")
            shadow = (version, 100.0 if percent is None else percent)
        else:
            split.append((version, percent))
    if not split:
        raise ConfigError(f"{where}: name the version that answers, e.g. v1 (or v1 90%, v2 10%)")
    given = sum(percent for _, percent in split if percent is not None)
    open_shares = [version for version, percent in split if percent is None]
    if len(open_shares) > 1:
        raise ConfigError(
            f"{where}: give every version but one its percentage (v{open_shares[1]} has none)"
        )
    if given > 100.0 + 1e-6 or (not open_shares and abs(given - 100.0) > 1e-6):
        raise ConfigError(f"{where}: the shares add up to {given:g}%, not 100%")
    rest = max(0.0, 100.0 - given)
    return TrafficRule(
        name,
        tuple((version, rest if percent is None else percent) for version, percent in split),
        shadow[0] if shadow else None,
        shadow[1] if shadow else 0.0,
        sticky,
    )


def parse_rules(spec: str) -> dict[str, TrafficRule]:
    """``SERVING_TRAFFIC``: ``name: rule; name: rule``, one rule per model."""
    rules: dict[str, TrafficRule] = {}
    for entry in (part.strip() for part in spec.split(";") if part.strip()):
        name, colon, text = entry.partition(":")
        name = name.strip()
        if not colon:
            raise ConfigError(
                f"SERVING_TRAFFIC: {entry[:40]!r} needs the model's name first, e.g."
                " digits: v1 90%, v2 10%"
            )
        if name in rules:
            raise ConfigError(f"SERVING_TRAFFIC: {name[:64]!r} has two rules")
        try:
            rules[name] = parse_rule(name, text.strip())
        except ConfigError as exc:
            raise ConfigError(f"SERVING_TRAFFIC: {exc}") from None
    return rules


def required_versions(rules: dict[str, TrafficRule]) -> frozenset[Key]:
    """Every (name, version) some rule names: served while the rule stands."""
    return frozenset((rule.name, version) for rule in rules.values() for version in rule.versions)


def _percent(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def role(rule: TrafficRule, version: int) -> str:
    """``stable``, ``candidate`` or ``shadow``: what ``version`` is in ``rule``."""
    if version == rule.shadow:
        return "shadow"
    return "stable" if version == rule.stable else "candidate"
