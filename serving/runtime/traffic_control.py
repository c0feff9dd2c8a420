"""Traffic rules changed while serving: set and cleared through the admin API, rolled back when a
candidate fails, and the same on every worker.

# design: the rules live in the workers' shared state (``serving.runtime.control_files``) next to
# the explicit mode's models: ``traffic`` (model -> rule text) and ``events``. Until the first
# change the state holds the ``SERVING_TRAFFIC`` rules. A change, like an explicit load, bumps the
# generation and answers once every live worker's watcher has acknowledged it (each puts the
# state's rules in force with ``sync`` before it acknowledges). A rollback is a change made by the
# first worker whose window condemns a candidate: it sets the candidate's weight to 0 under the
# state's lock (a second worker that condemns it too finds it done and changes nothing), logs it,
# counts it and records the event; every other worker applies it within a tick.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from datetime import UTC, datetime
from typing import Any

from serving.errors import ConfigError, InvalidRequest, ModelNotFound
from serving.observability import metrics
from serving.runtime.control_files import ControlFiles, State
from serving.runtime.model_control import ControlError, ModelControl
from serving.runtime.service import InferenceService
from serving.runtime.traffic import check_rule, merged_totals
from serving.runtime.traffic_rules import TrafficRule, parse_rule, role
from serving.runtime.traffic_window import Totals

log = logging.getLogger("serving")
#: Events kept in the shared state (the oldest are dropped first).
MAX_EVENTS = 100


class TrafficControl:
    """One worker's side of the shared traffic rules: the admin verbs, ``sync`` and rollbacks.
    ``TrafficControl.of(service)`` is the one instance per service."""

    _instances: weakref.WeakKeyDictionary[InferenceService, TrafficControl] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock = threading.Lock()

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        #: Model control owns the shared files and knows how many workers acknowledge a change.
        self.models = ModelControl.of(service)

    @classmethod
    def of(cls, service: InferenceService) -> TrafficControl:
        with cls._instances_lock:
            control = cls._instances.get(service)
            if control is None:
                control = cls._instances[service] = cls(service)
            return control

    @property
    def files(self) -> ControlFiles:
        return self.models.files

    def rules(self, state: State | None) -> dict[str, TrafficRule]:
        """The rules a shared state holds (the settings' until the first change)."""
        if state is None or "traffic" not in state:
            return dict(self.service.traffic.configured)
        rules = {}
        for name, text in state["traffic"].items():
            try:
                rules[name] = parse_rule(name, text)
            except ConfigError as exc:  # a state edited by hand: that rule is ignored
                log.error("ignoring the shared traffic rule for %s: %s", name, exc)
        return rules

    def sync(self, state: State | None) -> None:
        """Put the shared state's rules in force in this worker (its watcher, before it
        acknowledges a generation)."""
        rules = self.rules(state)
        traffic = self.service.traffic
        if rules != {name: release.rule for name, release in traffic.releases.items()}:
            traffic.apply(rules)
            self.service.planner.required = traffic.required

    # -- the admin API ---------------------------------------------------------------------------
    def set(self, name: str, text: str, timeout_s: float) -> dict[str, Any]:
        """Put a rule for ``name`` in force on every worker; answers once all acknowledged it."""
        service = self.service
        service.key(name)  # 404 for a model that is not served
        try:
            rule = parse_rule(name, text)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        try:
            check_rule(rule, service.served)
        except ConfigError as exc:  # the rule conflicts with what is served: 409
            raise ControlError(f"{exc}; load the version first", 409) from None
        event = {"event": "set", "rule": rule.text()}
        generation = self.files.edit(
            lambda state: {
                **state,
                "traffic": {**state["traffic"], name: rule.text()},
                "events": _with_event(state, name, event),
            },
            self._initial(),
        )
        assert generation is not None
        log.info("traffic for %s: %s (generation %d)", name, rule.text(), generation)
        return self._answer(name, rule.text(), generation, timeout_s)

    def clear(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Drop ``name``'s rule on every worker: its unversioned requests go to the latest served
        version again."""
        if name not in self.rules(self.files.read()):
            raise ModelNotFound(f"model {name[:64]!r} has no traffic rule")

        def change(state: State) -> State | None:
            if name not in state["traffic"]:
                return None
            traffic = {n: text for n, text in state["traffic"].items() if n != name}
            return {
                **state,
                "traffic": traffic,
                "events": _with_event(state, name, {"event": "cleared"}),
            }

        generation = self.files.edit(change, self._initial())
        if generation is None:
            raise ModelNotFound(f"model {name[:64]!r} has no traffic rule")
        log.info("traffic rule for %s cleared (generation %d)", name, generation)
        return self._answer(name, None, generation, timeout_s)

    def status(self, name: str) -> dict[str, Any]:
        """The rule for ``name``, each version's window added up over every worker, the shadow's
        agreement and latency difference, and the rule's recent events."""
        self.service.key(name)
        state = self.files.read()
        rule = self.rules(state).get(name)
        acks = [ack for ack in self.files.acks() if ack.get("traffic")] or [
            {"traffic": self.service.traffic.snapshot()}
        ]
        events = [event for event in (state or {}).get("events", []) if event["model"] == name]
        document: dict[str, Any] = {
            "name": name,
            "rule": rule.text() if rule else None,
            "window_s": self.service.settings.traffic_window_s,
            "workers": len(acks),
            "versions": [],
            "events": events,
        }
        if rule is None:
            return document
        totals, paired = merged_totals(acks, name)
        for version in rule.versions:
            weight = rule.shadow_percent if version == rule.shadow else rule.weight(version)
            document["versions"].append(
                {
                    "version": str(version),
                    "role": role(rule, version),
                    "percent": weight,
                    **totals.get(str(version), Totals()).summary(),
                }
            )
        if rule.shadow is not None:
            shadow = totals.get(str(rule.shadow), Totals())
            document["shadow"] = {
                "version": str(rule.shadow),
                "percent": rule.shadow_percent,
                "compared": shadow.compared,
                "agreement": round(shadow.agreed / shadow.compared, 4) if shadow.compared else None,
                "latency_difference_ms": {
                    label: _difference(shadow.quantile(q), paired.quantile(q))
                    for label, q in (("p50", 0.5), ("p99", 0.99))
                },
            }
        return document

    # -- the watcher's verdicts --------------------------------------------------------------------
    def roll_back(self, name: str, version: int, kind: str, reason: str) -> bool:
        """Take a failing candidate out of traffic on every worker (weight 0; a shadow stops);
        False when another worker already did, or the rule changed meanwhile."""

        def change(state: State) -> State | None:
            rule = self.rules(state).get(name)
            if rule is None or version not in rule.candidates():
                return None
            event = {
                "event": "rollback",
                "version": str(version),
                "reason": reason,
                "kind": kind,
                "rule": rule.rolled_back(version).text(),
                "worker": os.getpid(),
            }
            return {
                **state,
                "traffic": {**state["traffic"], name: rule.rolled_back(version).text()},
                "events": _with_event(state, name, event),
            }

        generation = self.files.edit(change, self._initial())
        if generation is None:
            return False
        metrics.TRAFFIC_ROLLBACKS.labels(name, str(version), kind).inc()
        log.warning(
            "rolled back %s:%d (weight 0, the stable version answers): %s", name, version, reason
        )
        return True

    def _initial(self) -> State:
        """The shared state before any change: the served models, the settings' rules."""
        configured = self.service.traffic.configured
        return {
            "models": sorted({name for name, _ in self.service.served}),
            "traffic": {name: rule.text() for name, rule in configured.items()},
            "events": [],
        }

    def _answer(
        self, name: str, text: str | None, generation: int, timeout_s: float
    ) -> dict[str, Any]:
        acks, behind = self.files.await_generation(generation, self.models.worker_count, timeout_s)
        if behind:
            raise ControlError(
                f"{behind} of {max(self.models.worker_count, len(acks))} workers did not apply"
                f" the traffic change within {timeout_s:g}s"
            )
        return {"name": name, "rule": text, "workers": len(acks), "generation": generation}


def _with_event(state: State, name: str, event: dict[str, Any]) -> list[dict[str, Any]]:
    stamped = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "model": name, **event}
    return [*state.get("events", []), stamped][-MAX_EVENTS:]


def _difference(candidate: float | None, stable: float | None) -> float | None:
    if candidate is None or stable is None:
        return None
    return round((candidate - stable) * 1000, 3)
