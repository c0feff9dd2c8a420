"""A model's traffic rule as one worker applies it (``Release``), and one request routed by it
(``Routed``).

# design: a ``Release`` changes only in its windows: a new rule makes a new release, which keeps the
# windows of the versions that stay in traffic. ``Routed.answer`` calls the version the release
# drew; when a candidate fails with a 5xx of its own, the stable version answers in the time that is
# left, so a failing candidate costs its clients latency, not errors. Every routed answer, and every
# shadow copy (compared in a shadow thread, ``serving.runtime.shadow``), is added to its version's
# window (``serving.runtime.traffic_window``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np

from serving.errors import ModelNotReady, ServiceStopping, ServingError
from serving.observability import metrics
from serving.runtime.loaded_model import LoadedModel
from serving.runtime.shadow import ShadowCopy, ShadowRunner
from serving.runtime.traffic_rules import TrafficRule, pick, role, sticky_draw
from serving.runtime.traffic_window import Window
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
