"""Canary and shadow traffic between versions of a model, as one worker applies it.

# design: ``Traffic`` holds the rules in force (``serving.runtime.traffic_rules``) as one dict of
# ``Release`` values, replaced in one assignment when a rule changes; a request reads it once. A
# request that names no version, for a model with a rule, is routed (``route``): the release draws
# the answering version by weight (a uniform draw, or the hash of the sticky header's value), and
# decides whether a copy goes to the shadow. The ``Routed`` answer then calls that version; when a
# candidate fails (a 5xx of its own), the stable version answers in the time that is left, so a
# failing candidate costs its clients latency, not errors. Every routed answer and every shadow
# copy is added to its version's window (``serving.runtime.traffic_window``); the model watcher asks
# ``verdicts`` four times a second and rolls back what fails its margins. A request with an explicit
# version, or for a model without a rule, never touches this module (``InferenceService.route``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from serving.config import Settings
from serving.errors import ConfigError, ModelNotReady, ServiceStopping, ServingError
from serving.observability import metrics
from serving.runtime.loaded_model import LoadedModel
from serving.runtime.model_table import ModelTable
from serving.runtime.shadow import ShadowCopy, ShadowRunner
from serving.runtime.traffic_rules import (
    Key,
    TrafficRule,
    parse_rules,
    pick,
    required_versions,
    sticky_draw,
)
from serving.runtime.traffic_window import Margins, Totals, Window, judge
from serving.store.repository import ModelMetadata

#: Reads a request header by name (the front's; the runtime never sees the request itself).
Header = Callable[[str], str | None]
#: Below this much time left, a failed candidate's request is not retried on the stable version.
MIN_FALLBACK_S = 0.002


def counts_against(error: ServingError) -> bool:
    """Whether a failure is the version's own: a 5xx, except a worker that is stopping or a
    version being unloaded (the same for any version)."""
    return error.status_code >= 500 and not isinstance(error, ServiceStopping | ModelNotReady)


class Release:
    """One model's rule as this worker applies it, with a window per version.

    A version's window survives a change of the rule while the version stays in traffic (a ramp
    from 10% to 20% keeps its record); a version coming back into traffic (after a rollback)
    starts a fresh one.
    """

    def __init__(
        self,
        rule: TrafficRule,
        window_s: float,
        shadows: ShadowRunner,
        previous: Release | None = None,
    ) -> None:
        self.rule, self.name, self.shadows = rule, rule.name, shadows
        self._bounds = rule.bounds()
        self._shadow_fraction = rule.shadow_percent / 100.0 if rule.shadow is not None else 0.0
        live = {rule.stable, *rule.candidates()}
        was_live = (
            {previous.rule.stable, *previous.rule.candidates()} if previous is not None else set()
        )
        self.windows: dict[int, Window] = {}
        for version in rule.versions:
            kept = previous.windows.get(version) if previous is not None else None
            if (
                previous is None
                or kept is None
                or (version in live and version not in was_live)
                or role(rule, version) != role(previous.rule, version)
            ):
                kept = Window(window_s)
            self.windows[version] = kept
        same_shadow = previous is not None and previous.rule.shadow == rule.shadow
        self.paired = previous.paired if same_shadow and previous else Window(window_s)
        name = self.name
        self._fallbacks = {v: metrics.TRAFFIC_FALLBACKS.labels(name, str(v)) for v in rule.versions}
        self._dropped = metrics.SHADOW_DROPPED.labels(name)
        if rule.shadow is not None:
            shadow = str(rule.shadow)
            self._agree = metrics.SHADOW_SAMPLES.labels(name, shadow, "agree")
            self._disagree = metrics.SHADOW_SAMPLES.labels(name, shadow, "disagree")
            self._latency_stable = metrics.SHADOW_LATENCY.labels(name, shadow, "stable")
            self._latency_shadow = metrics.SHADOW_LATENCY.labels(name, shadow, "shadow")

    def choose(self, header: Header | None) -> int:
        """The version that answers: by the sticky header's value when the rule has one and the
        request carries it, else by a uniform draw."""
        sticky = self.rule.sticky
        if sticky and header is not None:
            value = header(sticky)
            if value:
                return pick(self._bounds, sticky_draw(self.name, value))
        return pick(self._bounds, random.random())

    def wants_shadow(self) -> bool:
        fraction = self._shadow_fraction
        return fraction > 0 and (fraction >= 1.0 or random.random() < fraction)

    def observe(self, model: LoadedModel, seconds: float, failed: bool) -> None:
        window = self.windows.get(model.meta.version)
        if window is not None:
            window.add(seconds, failed)

    def fell_back(self, model: LoadedModel) -> None:
        counter = self._fallbacks.get(model.meta.version)
        if counter is not None:
            metrics.TALLY.inc(counter)

    def copy(
        self,
        shadow: LoadedModel,
        batch: np.ndarray,
        answer: np.ndarray,
        seconds: float,
        timeout_s: float,
    ) -> None:
        """Queue a copy of an answered request for the shadow (dropped and counted when full)."""
        if not self.shadows.submit(
            ShadowCopy(self.compare, shadow, batch, answer, seconds, timeout_s)
        ):
            metrics.TALLY.inc(self._dropped)

    def compare(self, copy: ShadowCopy) -> None:
        """A shadow thread: the copy through the shadow version, scored against the stable
        answer."""
        model: LoadedModel = copy.model
        started = time.perf_counter()
        try:
            output = model.infer(copy.batch, copy.timeout_s)
        except ServingError as error:
            self.observe(model, time.perf_counter() - started, counts_against(error))
            return
        elapsed = time.perf_counter() - started
        samples = len(copy.batch)
        agreed = int(np.count_nonzero(output.argmax(axis=1) == copy.answer.argmax(axis=1)))
        window = self.windows.get(model.meta.version)
        if window is not None:
            window.add(elapsed, False, compared=samples, agreed=agreed)
        self.paired.add(copy.seconds, False)
        tally = metrics.TALLY
        tally.inc(self._agree, agreed)
        tally.inc(self._disagree, samples - agreed)
        tally.observe(self._latency_stable, copy.seconds)
        tally.observe(self._latency_shadow, elapsed)


class Routed:
    """A request routed by a release: the version drawn for it, the stable version to fall back
    on, and the shadow that gets a copy (or None). Quacks like ``LoadedModel`` for the handlers:
    ``meta``, ``label``, ``answer``."""

    __slots__ = ("release", "model", "stable", "shadow")

    def __init__(
        self, release: Release, model: LoadedModel, stable: LoadedModel, shadow: LoadedModel | None
    ) -> None:
        self.release, self.model, self.stable, self.shadow = release, model, stable, shadow

    @property
    def meta(self) -> ModelMetadata:
        return self.model.meta

    @property
    def label(self) -> str:
        return self.model.label

    def answer(self, batch: np.ndarray, timeout_s: float) -> tuple[np.ndarray, LoadedModel]:
        """The probabilities and the version that gave them."""
        release, model = self.release, self.model
        started = time.perf_counter()
        try:
            output = model.infer(batch, timeout_s)
        except ServingError as error:
            elapsed = time.perf_counter() - started
            release.observe(model, elapsed, counts_against(error))
            left = timeout_s - elapsed
            if model is self.stable or isinstance(error, ServiceStopping) or left < MIN_FALLBACK_S:
                raise
            release.fell_back(model)
            return self._stable(batch, left), self.stable
        elapsed = time.perf_counter() - started
        release.observe(model, elapsed, False)
        if self.shadow is not None:
            release.copy(self.shadow, batch, output, elapsed, timeout_s)
        return output, model

    def _stable(self, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        started = time.perf_counter()
        try:
            output = self.stable.infer(batch, timeout_s)
        except ServingError as error:
            self.release.observe(self.stable, time.perf_counter() - started, counts_against(error))
            raise
        self.release.observe(self.stable, time.perf_counter() - started, False)
        return output


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
    height, width = meta.input_shape
    inputs = f"{height}x{width} {meta.input_dtype} in {list(meta.input_range)}"
    return f"{inputs} with {len(meta.labels)} labels"


def role(rule: TrafficRule, version: int) -> str:
    """``stable``, ``candidate`` or ``shadow``: what ``version`` is in ``rule``."""
    if version == rule.shadow:
        return "shadow"
    return "stable" if version == rule.stable else "candidate"
