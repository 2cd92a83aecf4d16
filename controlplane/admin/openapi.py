"""The admin API's OpenAPI 3.1 document, served at `/openapi.json` (docs/admin-api.md is the prose)."""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def _ok(description: str, media: str = JSON) -> dict[str, Any]:
    return {"200": {"description": description, "content": {media: {"schema": {"type": "object"}}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad request", 401: "missing or wrong bearer token", 404: "not found", 503: "not ready"}
    return {
        str(c): {"description": text[c], "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for c in codes
    }


def _store_down() -> dict[str, Any]:
    """503 of a change while the shared store (etcd, `controlplane.store`) cannot be reached."""
    return {
        "503": {
            "description": "the shared store (etcd) is unavailable: nothing was changed (field: store)",
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    }


def _param(name: str, where: str, description: str, *, required: bool = False, enum: list[str] | None = None) -> Any:
    schema: dict[str, Any] = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": description,
        "schema": schema,
    }


def _get(summary: str, *params: Any, ok: dict[str, Any] | None = None, errors: tuple[int, ...] = ()) -> Any:
    return {
        "get": {
            "summary": summary,
            "parameters": list(params),
            "responses": {**(ok or _ok(summary)), **_errors(*errors)},
        }
    }


STATUSES = ["HEALTHY", "UNHEALTHY", "DRAINING", "DEGRADED", "TIMEOUT", "UNKNOWN"]
# ?status= takes a status or nginx check_status's up (HEALTHY, UNKNOWN, DEGRADED) or down (the rest).
STATUS_FILTER = [*STATUSES, "up", "down"]


def document() -> dict[str, Any]:
    change: list[dict[str, list[str]]] = [{"bearer": []}]
    who = _param("X-Healthplane-Who", "header", "who makes the change, recorded in its event")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "healthplane admin API",
            "version": "1",
            "description": "Inspect snapshots, nodes and endpoint health; override endpoints; change the topology.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string", "description": "what is wrong"},
                        "field": {"type": "string", "description": "the field, parameter or path at fault"},
                    },
                }
            },
        },
        "paths": {
            "/healthz": _get("the control plane process is up"),
            "/readyz": _get("ready: first snapshot built and the prober's first full state in", errors=(503,)),
            "/snapshot": _get("the served snapshot: endpoints with status, reason, source; listeners; probers"),
            "/snapshots": _get(
                "recent snapshots, newest first, with each version's cause and time",
                _param("limit", "query", "at most this many"),
                errors=(400,),
            ),
            "/snapshots/{version}": _get(
                "one snapshot from history", _param("version", "path", "a version"), errors=(404,)
            ),
            "/snapshots/{a}/diff/{b}": _get(
                "what changed from a to b: endpoints added, removed, status changes; resources by type",
                _param("a", "path", "the older version"),
                _param("b", "path", "the newer version"),
                errors=(404,),
            ),
            "/nodes": _get("connected Envoys: subscriptions, versions sent and ACKed per type, last NACK"),
            "/nodes/{node_id}": _get("one connected node", _param("node_id", "path", "node.id"), errors=(404,)),
            "/probers": _get("the embedded prober and remote probers"),
            "/endpoints": _get(
                "every endpoint: status, reason, since, override, check counters, last check",
                _param("cluster", "query", "only this cluster"),
                _param("status", "query", "only this served status, or nginx's up or down", enum=STATUS_FILTER),
                errors=(400, 404),
            ),
            "/status": _get(
                "the status page (as nginx check_status): one row per endpoint",
                _param("format", "query", "html (default), csv or json", enum=["html", "csv", "json"]),
                _param("refresh", "query", "HTML: reload every N seconds (default 5, 0: never)"),
                _param("cluster", "query", "only this cluster"),
                _param("status", "query", "only this status, or nginx's up or down (any case)", enum=STATUS_FILTER),
                ok={
                    "200": {
                        "description": "the status table",
                        "content": {
                            "text/html": {"schema": {"type": "string"}},
                            "text/csv": {"schema": {"type": "string"}},
                            JSON: {"schema": {"type": "object"}},
                        },
                    }
                },
                errors=(400, 404),
            ),
            "/events": _get(
                "recent events (health, override, nack, topology, node, prober), oldest first",
                _param("limit", "query", "at most this many (default 100)"),
                _param("kind", "query", "only this kind"),
                errors=(400,),
            ),
            "/events/stream": _get(
                "the same events live, as server-sent events (id, event: KIND, data: JSON)",
                _param("kind", "query", "only this kind"),
                _param("since", "query", "replay events after this id first (or the Last-Event-ID header)"),
                _param("Last-Event-ID", "header", "replay events after this id first"),
                ok=_ok("an endless text/event-stream", "text/event-stream"),
                errors=(400,),
            ),
            "/metrics": _get(
                "Prometheus metrics", ok={"200": {"description": "exposition format", "content": {"text/plain": {}}}}
            ),
            "/openapi.json": _get("this document"),
            # issue 5: propagation measured at every node's ACK
            "/versions": _get(
                "tracked versions, newest first: cause, nodes concerned, ACKed, NACKed, pending, convergence",
                _param("limit", "query", "at most this many"),
                errors=(400, 404),
            ),
            "/versions/{version}": _get(
                "one version's propagation: per node sent, ACK or NACK (ms since the cause), nodes not ACKed",
                _param("version", "path", "a version"),
                errors=(404,),
            ),
            "/propagation": _get(
                "an HTML page: each version's convergence and each node's version over time (inline SVG)",
                _param("limit", "query", "the last this many versions (default 10)"),
                _param("refresh", "query", "reload every N seconds (default 0: never)"),
                ok=_ok("the page", "text/html"),
                errors=(400, 404),
            ),
            "/endpoints/{cluster}/{endpoint}/override": {
                "post": {
                    "summary": "pin an endpoint's status, or clear the pin with auto",
                    "security": change,
                    "parameters": [
                        _param("cluster", "path", "cluster name"),
                        _param("endpoint", "path", "ADDRESS:PORT"),
                        who,
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {
                                        "status": {"type": "string", "enum": [*STATUSES[:4], "auto"]},
                                        "who": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        **_ok("the endpoint's status now and the version"),
                        **_errors(400, 401, 404),
                        **_store_down(),
                    },
                }
            },
            "/replicas": _get(
                "every replica sharing this one's store (etcd): id, admin URL, xDS address, version, EDS digest; "
                "agree is true when every digest is the same (without a store: this replica alone)"
            ),
            "/topology": {
                "put": {
                    "summary": "serve a whole new topology (JSON or YAML), validated exactly as the file is",
                    "security": change,
                    "parameters": [who],
                    "requestBody": {
                        "required": True,
                        "content": {JSON: {"schema": {"type": "object"}}, "application/yaml": {}},
                    },
                    "responses": {
                        **_ok("the new version and counts (with a store: local_settings_not_shared)"),
                        **_errors(400, 401),
                        **_store_down(),
                    },
                }
            },
            "/topology/reload": {
                "post": {
                    "summary": "re-read the topology file now (a bad file is reported and the last good one kept)",
                    "security": change,
                    "parameters": [who],
                    "responses": {**_ok("the version served"), **_errors(400, 401)},
                }
            },
            **_fault_paths(change, who),
        },
    }


def _fault_paths(change: list[dict[str, list[str]]], who: Any) -> dict[str, Any]:
    """issue 7a: alarms, accepting a held mass failure, NACKs grouped by version."""
    return {
        "/alarms": _get("active and recently resolved alarms (prober_stale, mass_failure) and held verdicts"),
        "/alarms/{id}/accept": {
            "post": {
                "summary": "apply the failures an active mass_failure alarm held",
                "security": change,
                "parameters": [_param("id", "path", "the alarm id (GET /alarms)"), who],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": {"type": "object", "properties": {"who": {"type": "string"}}}}},
                },
                "responses": {
                    **_ok("the resolved alarm and the version served"),
                    **_errors(400, 401, 404),
                    **_store_down(),
                    "409": {
                        "description": "the alarm is resolved or not a mass_failure alarm",
                        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                },
            }
        },
        "/nacks": _get("NACKs grouped by rejected (type, version), with the change that made the version"),
        "/probers/{id}": {
            "delete": {
                "summary": "forget a disconnected prober for good: its votes, check states and staleness alarm",
                "security": change,
                "parameters": [_param("id", "path", "the prober id (GET /probers)"), who],
                "responses": {
                    **_ok("the prober forgotten, and the version served after the others decided again"),
                    **_errors(401, 404),
                    **_store_down(),
                    "409": {
                        "description": "the prober is connected",
                        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                },
            }
        },
    }
