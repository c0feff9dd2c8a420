"""Traffic rules through the admin API, beside the repository extension's load and unload.

    GET    /v2/repository/models/{name}/traffic   the rule, each version's window, the shadow's
                                                  agreement and latency difference, recent events
    POST   /v2/repository/models/{name}/traffic   {"rule": "v1 90%, v2 10%"}: on every worker
    DELETE /v2/repository/models/{name}/traffic   drop the rule: the latest served version answers

A rule is the grammar of ``SERVING_TRAFFIC`` for one model (``serving.runtime.traffic_rules``). A
change answers once every worker has applied it, as an explicit load does; a rule naming a version
that is not served, or one whose input or labels differ from the stable version's, is a 409.
"""

from __future__ import annotations

from serving.errors import InvalidRequest
from serving.http.answers import Answer, json_answer
from serving.http.encoding import parse_json_object
from serving.http.request import RequestState
from serving.protocol.openapi import STRING, obj
from serving.runtime.service import InferenceService
from serving.runtime.traffic_control import TrafficControl

RULE_BODY = obj(["rule"], rule=STRING) | {"example": {"rule": "v1 90%, v2 10%, sticky X-User-Id"}}


def traffic_status(request: RequestState, service: InferenceService, name: str) -> Answer:
    """``GET /v2/repository/models/{name}/traffic``."""
    return json_answer(TrafficControl.of(service).status(name))


def set_traffic(request: RequestState, service: InferenceService, name: str) -> Answer:
    """``POST /v2/repository/models/{name}/traffic`` with ``{"rule": "..."}``."""
    payload = parse_json_object(request.body(service.body_limit))
    rule = payload.get("rule")
    if not isinstance(rule, str) or not rule.strip():
        raise InvalidRequest(
            'the body must be {"rule": "..."}, e.g. {"rule": "v1 90%, v2 10%"}'
            " (docs/operations.md, canary and shadow traffic)"
        )
    control = TrafficControl.of(service)
    return json_answer(control.set(name, rule, service.settings.timeout))


def clear_traffic(request: RequestState, service: InferenceService, name: str) -> Answer:
    """``DELETE /v2/repository/models/{name}/traffic``."""
    return json_answer(TrafficControl.of(service).clear(name, service.settings.timeout))
