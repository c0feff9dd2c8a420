"""Canary and shadow traffic between versions of a model, as one worker applies it.

# design: ``Traffic`` holds the rules in force (``serving.runtime.traffic_rules``) as one dict of
# ``Release`` values, replaced in one assignment when a rule changes; a request reads it once. A
# request that names no version, for a model with a rule, is routed (``route``): the release draws
# the answering version by weight (a uniform draw, or the hash of the sticky header's value), and
# decides whether a copy goes to the shadow; the ``Routed`` answer (``serving.runtime.release``)
# calls that version, falls back to the stable one, and adds every answer to its version's window
# (``serving.runtime.traffic_window``). The model watcher asks ``verdicts`` four times a second and
# rolls back what fails its margins. A request with an explicit version, or for a model without a
# rule, never touches this module (``InferenceService.route``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.config import Settings
from serving.errors import ConfigError
from serving.observability import metrics
from serving.runtime.model_table import ModelTable
from serving.runtime.release import Header, Release, Routed
from serving.runtime.shadow import ShadowRunner
from serving.runtime.traffic_rules import (
    Key,
    TrafficRule,
    parse_rules,
    required_versions,
    role,
)
from serving.runtime.traffic_window import Margins, Totals, judge
from serving.store.repository import ModelMetadata


class Traffic:
    """The traffic rules this worker applies: routing, shadow threads, and rollback verdicts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The rules of ``SERVING_TRAFFIC``: in force until the admin API changes them.
        self.configured = parse_rules(settings.traffic)
        self.margins = Margins(
            settings.traffic_error_margin,
            settings.traffic_p99_margin_ms / 1000.0,
            settings.traffic_min_requests,
            settings.traffic_window_s,
        )
        self.shadows = ShadowRunner(settings.threads_per_worker, settings.shadow_queue)
        #: model name -> its release; replaced whole (``apply``), never changed in place.
        self.releases: dict[str, Release] = {}
        self._weights: dict[tuple[str, str, str], float] = {}
        self.apply(self.configured)

    @property
    def required(self) -> frozenset[Key]:
        """Every version the rules in force name: the planner keeps them served."""
        return required_versions({name: r.rule for name, r in self.releases.items()})

    def apply(self, rules: Mapping[str, TrafficRule]) -> None:
        """Put ``rules`` in force (unchanged rules keep their release and windows)."""
        old = self.releases
        releases = {}
        for name, rule in rules.items():
            previous = old.get(name)
            releases[name] = (
                previous
                if previous is not None and previous.rule == rule
                else Release(rule, self.settings.traffic_window_s, self.shadows, previous)
            )
        self.releases = releases
        weights = {
            (rule.name, str(version), role(rule, version)): rule.shadow_percent
            if version == rule.shadow
            else rule.weight(version)
            for rule in (release.rule for release in releases.values())
            for version in rule.versions
        }
        for labels in self._weights.keys() - weights.keys():  # a version that left a rule, or
            metrics.TRAFFIC_WEIGHT.labels(*labels).set(0)  # changed role: 0 under its old labels
        for labels, weight in weights.items():
            metrics.TRAFFIC_WEIGHT.labels(*labels).set(weight)
        self._weights = weights

    def route(self, table: ModelTable, name: str, header: Header | None) -> Routed | None:
        """The routed answer for an unversioned request to ``name``; None when it has no rule or
        none of its versions is served here (the latest served version answers)."""
        release = self.releases.get(name)
        if release is None:
            return None
        models = table.models
        stable = models.get((name, release.rule.stable))
        model = models.get((name, release.choose(header))) or stable
        if model is None:
            return None
        shadow = None  # copies of what the stable version answers: compared with its answers
        if model is stable and release.rule.shadow is not None and release.wants_shadow():
            shadow = models.get((name, release.rule.shadow))
        return Routed(release, model, stable or model, shadow)

    def verdicts(self) -> list[tuple[str, int, str, str]]:
        """(model, version, ``errors`` or ``latency``, why) for each candidate that fails its
        margins in this worker's window; empty when automatic rollback is off."""
        if not self.settings.traffic_rollback:
            return []
        found = []
        for release in self.releases.values():
            stable = release.windows[release.rule.stable].totals()
            for version in release.rule.candidates():
                verdict = judge(stable, release.windows[version].totals(), self.margins)
                if verdict is not None:
                    found.append((release.name, version, *verdict))
        return found

    def snapshot(self) -> dict[str, Any]:
        """This worker's windows, for its acknowledgement file (the status adds up every
        worker's)."""
        return {
            name: {
                "versions": {str(v): w.totals().as_json() for v, w in release.windows.items()},
                "paired": release.paired.totals().as_json(),
            }
            for name, release in self.releases.items()
        }

    def close(self) -> None:
        self.shadows.close()


def check_rule(rule: TrafficRule, served: Mapping[Key, Any]) -> None:
    """ConfigError unless every version of ``rule`` is served, with the stable version's input
    and labels (a request is decoded once, for whichever version answers)."""
    missing = [v for v in rule.versions if (rule.name, v) not in served]
    if missing:
        raise ConfigError(
            f"traffic rule for {rule.name}: version {missing[0]} is not served"
            f" (served: {', '.join(str(v) for n, v in served if n == rule.name) or 'none'})"
        )
    stable: ModelMetadata = served[(rule.name, rule.stable)][0]
    for version in rule.versions:
        meta: ModelMetadata = served[(rule.name, version)][0]
        if _contract(meta) != _contract(stable):
            raise ConfigError(
                f"traffic rule for {rule.name}: version {version} takes"
                f" {_describe(meta)} but version {rule.stable} takes {_describe(stable)}; a rule"
                " shares requests between versions with the same input and labels"
            )


def merged_totals(acks: list[dict[str, Any]], name: str) -> tuple[dict[str, Totals], Totals]:
    """Every worker's windows for ``name`` added up: per version, and the shadow's paired stable."""
    versions: dict[str, Totals] = {}
    paired = Totals()
    for ack in acks:
        entry = (ack.get("traffic") or {}).get(name)
        if not entry:
            continue
        for version, data in entry.get("versions", {}).items():
            versions[version] = versions.get(version, Totals()).merge(Totals.from_json(data))
        paired = paired.merge(Totals.from_json(entry.get("paired", {})))
    return versions, paired


def _contract(meta: ModelMetadata) -> tuple[Any, ...]:
    return meta.input_shape, meta.input_dtype, tuple(meta.input_range), tuple(meta.labels)


def _describe(meta: ModelMetadata) -> str:
    inputs = f"{meta.describe_input()}, {meta.input_dtype} in {list(meta.input_range)}"
    return f"{inputs} with {len(meta.labels)} labels"
