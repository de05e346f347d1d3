"""A stateful Kubernetes API server emulator on 127.0.0.1, built on kmock's KubernetesEmulator.

kmock 0.8 serves discovery, records requests and lets tests inject reactions (``emu['patch'] << 500``),
but its object state is a plain JSON merge store. This subclass replaces that state machine with
the API-server semantics kopf, kr8s (dask-kubernetes) and kubectl rely on: uid, one global monotonic
resourceVersion, generation, creationTimestamp, generateName, namespace from the URL, 201 on create,
409 on conflicts, merge / JSON / strategic(-as-merge) patches with JSON-patch ``test`` failures as
422, a ``/status`` subresource, typed lists with label/field selectors, watch streams (with
resourceVersion replay and ``timeoutSeconds``), finalizers, background ownerReference garbage
collection, namespaces, CRDs that become discoverable when posted, CRD schema validation (422) and
server-side Table printing for ``kubectl get``.

What it deliberately does not do: authentication/RBAC, admission webhooks, server-side apply
(415), strategic-merge list semantics (lists are replaced as in a JSON merge patch), and
controllers (no ReplicaSets or Pods appear for a Deployment: see tests/operator/kubelet.py).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import pathlib
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp.web
import attrs
import jsonschema
import kmock
import yarl
from kmock._internal import apps as kmock_apps
from kmock._internal import rendering as kmock_rendering

Obj = dict[str, Any]
_ORIGINAL_PATH_HEADER = "X-Emulator-Original-Path"
_ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def _now() -> str:
    """An RFC 3339 timestamp in UTC, second precision, as the API server writes them."""
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class Route:
    """A parsed resource URL: /api/v1/... or /apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/SUB]]."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_route(path: str) -> Route | None:
    """Parse an API path into a Route; None for discovery or non-resource paths."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (group == "" and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = "/".join(rest[2:]) or None
    return Route(group, version, plural, namespace, name, sub)


# --------------------------------------------------------------------------------------------------
# Pure helpers: patches, selectors, schemas.


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class PatchTestFailed(Exception):
    """A JSON-patch ``test`` operation did not match (the API server answers 422)."""


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for tok in tokens:
        doc = doc[int(tok)] if isinstance(doc, list) else doc[tok]
    return doc


def json_patch(doc: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test) on a deep copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for op in operations:
        kind = op.get("op")
        tokens = _pointer(op["path"])
        if kind == "test":
            try:
                current = _resolve(doc, tokens)
            except (KeyError, IndexError, ValueError):
                raise PatchTestFailed(f"path {op['path']!r} does not exist") from None
            if current != op.get("value"):
                raise PatchTestFailed(f"path {op['path']!r}: {current!r} != {op.get('value')!r}")
            continue
        if kind in ("move", "copy"):
            src = _pointer(op["from"])
            value = copy.deepcopy(_resolve(doc, src))
            if kind == "move":
                parent = _resolve(doc, src[:-1])
                parent.pop(int(src[-1]) if isinstance(parent, list) else src[-1])
            kind, op = "add", {"path": op["path"], "value": value}
        if not tokens:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise ValueError("cannot remove the document root")
        parent = _resolve(doc, tokens[:-1])
        last = tokens[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if last not in parent:
                    raise KeyError(last)
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            parent.pop(int(last) if isinstance(parent, list) else last)
        else:
            raise ValueError(f"unknown JSON-patch op {kind!r}")
    return doc


def _split_top(expr: str) -> list[str]:
    """Split a selector on commas that are not inside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in expr:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return [p.strip() for p in out if p.strip()]


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    for term in _split_top(selector):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (key in labels and labels[key] in values):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_value(obj: Obj, dotted: str) -> str:
    cur: Any = obj
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def field_selector_matches(selector: str, obj: Obj) -> bool:
    """Field selector on dotted paths: metadata.name=x, status.phase!=Running, ..."""
    for term in _split_top(selector):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if _field_value(obj, key.strip()) == value.strip():
                return False
        else:
            key, value = re.split(r"==?", term, maxsplit=1)
            if _field_value(obj, key.strip()) != value.strip():
                return False
    return True


def to_json_schema(schema: Any) -> Any:
    """Translate an OpenAPI v3 structural schema to JSON Schema (``nullable`` -> a null type)."""
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def schema_errors(schema: Obj, obj: Obj) -> list[str]:
    """Validation messages for ``obj`` (metadata excluded) against a CRD version's schema."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
    ]


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's short age ("42s", "5m", "3h", "2d") of an RFC 3339 timestamp."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(0, int(((now or datetime.datetime.now(tz=datetime.UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _jsonpath_simple(obj: Obj, path: str) -> Any:
    """Evaluate the simple JSONPath of a printer column (``.status.phase``, ``.a.b[0].c``)."""
    cur: Any = obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path.strip().lstrip("{").rstrip("}")):
        if part.startswith("["):
            idx = int(part[1:-1])
            cur = cur[idx] if isinstance(cur, list) and len(cur) > idx else None
        else:
            cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


# --------------------------------------------------------------------------------------------------
# The emulator.


@attrs.frozen
class TypeInfo:
    """What the server knows about one served resource (from built-ins or a CRD)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool
    schema: Obj | None = None
    printer_columns: tuple[Obj, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


class ApiError(kmock.KubernetesError):
    """A Kubernetes Status error (kmock renders it as a Status object with the code)."""


def _error(status: int, reason: str, message: str) -> ApiError:
    return ApiError(status=status, reason=reason, message=message, details={})


@attrs.define(kw_only=True)
class KubernetesApiEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the state machine of an API server (see the module doc)."""

    _types: dict[tuple[str, str, str], TypeInfo] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str, str | None, str], Obj] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=1000, init=False)
    _log: list[tuple[int, tuple[str, str], str, Obj]] = attrs.field(factory=list, init=False)
    _changed: asyncio.Event | None = attrs.field(default=None, init=False)  # replaced on every change
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        # Skip the parent's plain merge-store reactions: keep only the scaffold (discovery, 404s),
        # and serve every resource URL from this class's state machine, above the scaffold.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        (self.fallback ** 1)[self._is_resource_request] << self._serve_resource
        (self.fallback ** 1)["get /version/"] << self._serve_server_version  # kr8s asks with a slash
        self.resources.load_bundled()
        for res in list(self.resources):
            info = self.resources[res]
            if info.kind and "list" in info.verbs:
                self._types[(res.group, res.version, res.plural)] = TypeInfo(
                    group=res.group, version=res.version, plural=res.plural, kind=info.kind,
                    namespaced=bool(info.namespaced), has_status="status" in info.subresources)
        self._put_raw(("", "namespaces"), None, "default",
                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})

    # ---- request plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser raises on the bare namespace collection (/api/v1/namespaces);
        # hand it an equivalent parseable path and keep the original for our own routing.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            headers = dict(raw_request.headers) | {_ORIGINAL_PATH_HEADER: raw_request.path}
            rel = yarl.URL("/api/v1/namespaces/-").with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=rel, headers=headers)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock_rendering.Request) -> aiohttp.web.StreamResponse:
        # Bypass kmock's KubernetesEmulator._handle (its merge store); reactions and fallbacks stay.
        if self._changed is None:
            self._changed = asyncio.Event()
        return await kmock_apps.RawHandler._handle(self, request)

    async def _serve_version(self, request: kmock_rendering.Request) -> Any:
        # kmock writes the core group's version as "/v1"; the API server (and kubectl) say "v1".
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]
        return payload

    @staticmethod
    def _route_of(request: kmock_rendering.Request) -> Route | None:
        return parse_route(request.headers.get(_ORIGINAL_PATH_HEADER) or request.url.path)

    def _is_resource_request(self, request: kmock_rendering.Request) -> bool:
        return self._route_of(request) is not None

    def _type_of(self, route: Route) -> TypeInfo:
        try:
            return self._types[(route.group, route.version, route.plural)]
        except KeyError:
            raise _error(404, "NotFound", f"the server could not find the requested resource "
                                          f"({route.group}/{route.version}, {route.plural})") from None

    async def _serve_resource(self, request: kmock_rendering.Request) -> kmock.Response:
        # Always an explicit status: kmock copies a returned Response's status onto the shared
        # reaction, so a bare payload after a 201 would otherwise be answered with 201 too.
        result = self._dispatch(request)
        if isinstance(result, kmock.Response):
            return result
        return kmock.Response(status=200, payload=result)

    def _dispatch(self, request: kmock_rendering.Request) -> Any:
        route = self._route_of(request)
        assert route is not None
        if route.group == "" and route.plural == "namespaces" and route.name == "-" and \
                request.headers.get(_ORIGINAL_PATH_HEADER):
            route = attrs.evolve(route, name=None)
        typ = self._type_of(route)
        ns = route.namespace if typ.namespaced else None
        method = request.method.value
        params = dict(request.params)
        if route.subresource not in (None, "status"):
            raise _error(404, "NotFound", f"subresource {route.subresource!r} is not emulated")
        if route.name is None:
            if method == "GET" and params.get("watch") in ("true", "1"):
                return self._watch_response(typ, ns, params)
            if method == "GET":
                return self._table_or(request, typ, self._list(typ, ns, params))
            if method == "POST":
                return kmock.Response(status=201, payload=self._create(typ, ns, request.data, params))
            if method == "DELETE":
                return self._delete_collection(typ, ns, params)
        else:
            if method == "GET" and params.get("watch") in ("true", "1"):
                params["fieldSelector"] = ",".join(
                    filter(None, [params.get("fieldSelector"), f"metadata.name={route.name}"]))
                return self._watch_response(typ, ns, params)
            if method == "GET":
                obj = self._get(typ, ns, route.name)
                return self._table_or(request, typ, obj)
            if method == "PUT":
                return self._update(typ, ns, route.name, request.data, route.subresource)
            if method == "PATCH":
                ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
                return self._patch(typ, ns, route.name, ctype, request.data, route.subresource)
            if method == "DELETE":
                return self._delete(typ, ns, route.name, request.data or {}, params)
        raise _error(405, "MethodNotAllowed", f"{method} is not supported on this URL")

    # ---- the store

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _notify(self, typ_key: tuple[str, str], event: str, obj: Obj) -> None:
        self._log.append((int(obj["metadata"]["resourceVersion"]), typ_key, event, copy.deepcopy(obj)))
        if self._changed is not None:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()  # wakes every watch that waits for the next change

    def _put_raw(self, typ_key: tuple[str, str], ns: str | None, name: str, obj: Obj) -> None:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = self._next_rv()
        self._store[(typ_key[0], typ_key[1], ns, name)] = obj

    def _key(self, typ: TypeInfo, ns: str | None, name: str) -> tuple[str, str, str | None, str]:
        return (typ.group, typ.plural, ns, name)

    def _get(self, typ: TypeInfo, ns: str | None, name: str) -> Obj:
        obj = self._store.get(self._key(typ, ns, name))
        if obj is None:
            raise _error(404, "NotFound", f'{typ.plural}{"." + typ.group if typ.group else ""} "{name}" not found')
        return copy.deepcopy(obj)

    def objects_of(self, group: str, plural: str, namespace: str | None = None) -> list[Obj]:
        """All stored objects of one resource (for test assertions), deep copies."""
        return [copy.deepcopy(o) for (g, p, ns, _), o in self._store.items()
                if g == group and p == plural and (namespace is None or ns == namespace)]

    def _matches(self, obj: Obj, params: dict[str, str]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        if (sel := params.get("labelSelector")) and not label_selector_matches(sel, labels):
            return False
        if (sel := params.get("fieldSelector")) and not field_selector_matches(sel, obj):
            return False
        return True

    def _list(self, typ: TypeInfo, ns: str | None, params: dict[str, str]) -> Obj:
        items = [copy.deepcopy(o) for (g, p, ons, _), o in sorted(self._store.items(), key=lambda kv: str(kv[0]))
                 if g == typ.group and p == typ.plural and (ns is None or ons == ns) and self._matches(o, params)]
        return {"apiVersion": typ.api_version, "kind": f"{typ.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _validate(self, typ: TypeInfo, obj: Obj) -> None:
        name = obj.get("metadata", {}).get("name", "")
        if typ.schema is not None:
            errors = schema_errors(typ.schema, obj)
            if errors:
                raise ApiError(status=422, reason="Invalid",
                               message=f'{typ.kind}.{typ.group} "{name}" is invalid: ' + "; ".join(errors),
                               details={"name": name, "group": typ.group, "kind": typ.kind,
                                        "causes": [{"message": e} for e in errors]})
        if typ.group == "apiextensions.k8s.io" and typ.plural == "customresourcedefinitions":
            spec = obj.get("spec") or {}
            names = spec.get("names") or {}
            if not spec.get("group") or not names.get("plural") or not names.get("kind") or not spec.get("versions"):
                raise _error(422, "Invalid", "CustomResourceDefinition needs spec.group, spec.names.plural, "
                                             "spec.names.kind and spec.versions")
            if name != f"{names['plural']}.{spec['group']}":
                raise _error(422, "Invalid", f"metadata.name must be spec.names.plural+'.'+spec.group: {name!r}")

    def _create(self, typ: TypeInfo, ns: str | None, body: Any, params: dict[str, str]) -> Obj:
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if typ.namespaced:
            if meta.get("namespace") and ns and meta["namespace"] != ns:
                raise _error(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
            ns = ns or meta.get("namespace") or "default"
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta["name"]
        if self._key(typ, ns, name) in self._store:
            raise _error(409, "AlreadyExists", f'{typ.plural} "{name}" already exists')
        obj["apiVersion"], obj["kind"] = typ.api_version, typ.kind
        for field in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"):
            meta.pop(field, None)
        meta["generation"] = 1
        if typ.has_status and typ.schema is not None:
            obj.pop("status", None)  # custom resources with a status subresource: create ignores .status
        self._validate(typ, obj)
        if params.get("dryRun"):
            return obj
        if typ.group == "apiextensions.k8s.io" and typ.plural == "customresourcedefinitions":
            self._establish_crd(obj)
        self._put_raw((typ.group, typ.plural), ns, name, obj)
        self._notify((typ.group, typ.plural), "ADDED", obj)
        return copy.deepcopy(obj)

    def _commit(self, typ: TypeInfo, ns: str | None, old: Obj, new: Obj) -> Obj:
        """Store a modified object: bump rv/generation when it changed; finish deletion if released."""
        new["metadata"]["uid"] = old["metadata"]["uid"]
        new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        new["metadata"]["name"] = old["metadata"]["name"]
        if ns is not None:
            new["metadata"]["namespace"] = ns
        if old["metadata"].get("deletionTimestamp"):
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        new["apiVersion"], new["kind"] = typ.api_version, typ.kind
        strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        new["metadata"]["generation"] = old["metadata"].get("generation", 1) + (strip(old) != strip(new))
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(new)
        self._validate(typ, new)
        if typ.group == "apiextensions.k8s.io" and typ.plural == "customresourcedefinitions":
            self._establish_crd(new)
        new["metadata"]["resourceVersion"] = self._next_rv()
        key = self._key(typ, ns, new["metadata"]["name"])
        self._store[key] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(typ, key)
        else:
            self._notify((typ.group, typ.plural), "MODIFIED", new)
        return copy.deepcopy(new)

    def _restrict(self, typ: TypeInfo, old: Obj, new: Obj, subresource: str | None) -> Obj:
        """The main URL ignores .status (when a status subresource exists); /status changes only it."""
        if subresource == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            return result
        if typ.has_status:
            new = dict(new)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return new

    def _update(self, typ: TypeInfo, ns: str | None, name: str, body: Any, sub: str | None) -> Obj:
        old = self._get(typ, ns, name)
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the request body must be a JSON object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", f'Operation cannot be fulfilled on {typ.plural} "{name}": '
                                          "the object has been modified; please apply your changes to the latest version")
        new = self._restrict(typ, old, copy.deepcopy(body), sub)
        new.setdefault("metadata", {})
        return self._commit(typ, ns, old, new)

    def _patch(self, typ: TypeInfo, ns: str | None, name: str, ctype: str, body: Any, sub: str | None) -> Obj:
        old = self._get(typ, ns, name)
        if ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = json_patch(old, body)
            except PatchTestFailed as e:
                raise _error(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise _error(422, "Invalid", f"JSON patch cannot be applied: {e!r}") from None
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise _error(400, "BadRequest", "a merge patch must be a JSON object")
            # Strategic merge is approximated by a JSON merge patch (lists are replaced, not merged).
            new = merge_patch(old, body)
        else:
            raise _error(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype!r}")
        rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", f'Operation cannot be fulfilled on {typ.plural} "{name}": the object has been modified')
        new = self._restrict(typ, old, new, sub)
        return self._commit(typ, ns, old, new)

    def _delete(self, typ: TypeInfo, ns: str | None, name: str, options: Obj, params: dict[str, str]) -> Obj:
        obj = self._get(typ, ns, name)
        key = self._key(typ, ns, name)
        policy = options.get("propagationPolicy") or params.get("propagationPolicy") or "Background"
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._store[key] = obj
                self._notify((typ.group, typ.plural), "MODIFIED", obj)
            return copy.deepcopy(obj)
        return self._remove(typ, key, orphan=policy == "Orphan")

    def _delete_collection(self, typ: TypeInfo, ns: str | None, params: dict[str, str]) -> Obj:
        listing = self._list(typ, ns, params)
        for item in listing["items"]:
            self._delete(typ, item["metadata"].get("namespace"), item["metadata"]["name"], {}, params)
        return listing

    def _remove(self, typ: TypeInfo, key: tuple[str, str, str | None, str], orphan: bool = False) -> Obj:
        obj = self._store.pop(key)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._notify((typ.group, typ.plural), "DELETED", obj)
        if typ.group == "apiextensions.k8s.io" and typ.plural == "customresourcedefinitions":
            self._retire_crd(obj)
        if typ.group == "" and typ.plural == "namespaces":
            for okey in [k for k in self._store if k[2] == key[3]]:
                if okey in self._store:
                    self._remove(self._type_by_plural(okey[0], okey[1]), okey)
        if not orphan:
            self._collect_garbage()
        return copy.deepcopy(obj)

    def _type_by_plural(self, group: str, plural: str) -> TypeInfo:
        return next(t for (g, _, p), t in self._types.items() if g == group and p == plural)

    def _collect_garbage(self) -> None:
        """Background cascading deletion: dependents whose owners are all gone are deleted."""
        live_uids = {o["metadata"]["uid"] for o in self._store.values()}
        for key, obj in list(self._store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key in self._store and refs and not any(r.get("uid") in live_uids for r in refs):
                typ = self._type_by_plural(key[0], key[1])
                self._delete(typ, key[2], key[3], {}, {})

    # ---- CRDs

    def _establish_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            typ = TypeInfo(
                group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                has_status="status" in subresources,
                schema=(version.get("schema") or {}).get("openAPIV3Schema") or {"type": "object"},
                printer_columns=tuple(version.get("additionalPrinterColumns") or ()))
            self._types[(typ.group, typ.version, typ.plural)] = typ
            self.resources[kmock.resource(typ.group, typ.version, typ.plural)] = kmock.ResourceInfo(
                namespaced=typ.namespaced, kind=typ.kind,
                singular=names.get("singular") or names["kind"].lower(), verbs=_ALL_VERBS,
                shortnames=set(names.get("shortNames") or ()), categories=set(names.get("categories") or ()),
                subresources={s for s in subresources if s in ("status", "scale")})
        crd["status"] = {
            "acceptedNames": dict(names),
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": _now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": _now()},
            ],
        }

    def _retire_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            self._types.pop((spec["group"], version["name"], spec["names"]["plural"]), None)
            res = kmock.resource(spec["group"], version["name"], spec["names"]["plural"])
            if res in self.resources:
                del self.resources[res]
        for key in [k for k in self._store if k[0] == spec["group"] and k[1] == spec["names"]["plural"]]:
            self._store.pop(key, None)

    # ---- watching

    def _watch_response(self, typ: TypeInfo, ns: str | None, params: dict[str, str]) -> kmock.Response:
        return kmock.Response(status=200, headers={"Content-Type": "application/json"},
                              payload=self._watch(typ, ns, params))

    async def _watch(self, typ: TypeInfo, ns: str | None, params: dict[str, str]) -> AsyncIterator[Any]:
        yield b""  # send the headers now, even if nothing happens for a while
        loop = asyncio.get_running_loop()
        timeout = float(params.get("timeoutSeconds") or 1800)
        deadline = loop.time() + timeout
        since = params.get("resourceVersion") or "0"
        typ_key = (typ.group, typ.plural)
        if since in ("", "0"):
            for item in self._list(typ, ns, params)["items"]:
                yield {"type": "ADDED", "object": item}
            pos = len(self._log)
        else:
            pos = next((i for i, (rv, *_) in enumerate(self._log) if rv > int(since)), len(self._log))
        while not self._closing:
            changed = self._changed
            assert changed is not None
            while pos < len(self._log):
                _, key, event, obj = self._log[pos]
                pos += 1
                if key == typ_key and (ns is None or obj["metadata"].get("namespace") == ns) \
                        and self._matches(obj, params):
                    yield {"type": event, "object": copy.deepcopy(obj)}
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            if pos < len(self._log):
                continue  # more changes arrived while the last events were being sent
            try:
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass

    # ---- kubectl's server-side printing

    def _table_or(self, request: kmock_rendering.Request, typ: TypeInfo, payload: Obj) -> Obj:
        if "as=Table" not in request.headers.get("Accept", ""):
            return payload
        items = payload["items"] if "items" in payload else [payload]
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        columns += [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                     "description": c.get("description", ""), "priority": c.get("priority", 0)}
                    for c in typ.printer_columns]
        has_age = any(c["jsonPath"] == ".metadata.creationTimestamp" for c in typ.printer_columns)
        if not has_age:
            columns.append({"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0})
        rows = []
        for item in items:
            cells = [item["metadata"]["name"]]
            for c in typ.printer_columns:
                value = _jsonpath_simple(item, c["jsonPath"])
                cells.append(human_age(value) if c.get("type") == "date" else value)
            if not has_age:
                cells.append(human_age(item["metadata"].get("creationTimestamp")))
            partial = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": item["metadata"]}
            rows.append({"cells": cells, "object": partial})
        return {"apiVersion": "meta.k8s.io/v1", "kind": "Table",
                "metadata": {"resourceVersion": str(self._rv)}, "columnDefinitions": columns, "rows": rows}

    async def close_watches(self) -> None:
        """End all watch streams (at shutdown, so the server does not wait for them)."""
        self._closing = True
        if self._changed is not None:
            self._changed.set()


class EmulatorThread:
    """Runs a KubernetesApiEmulator on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self) -> None:
        self.emulator = KubernetesApiEmulator()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url: str = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            await self.emulator.close_watches()
            await asyncio.sleep(0.05)  # let watch loops notice and finish

    def start(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes API emulator did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the emulator's loop (thread-safe access to its state)."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def objects(self, group: str, plural: str, namespace: str | None = None) -> list[Obj]:
        """Thread-safe snapshot of the stored objects of one resource."""
        return self.call(self.emulator.objects_of, group, plural, namespace)

    def write_kubeconfig(self, path: pathlib.Path, namespace: str = "default") -> pathlib.Path:
        """A kubeconfig pointing at the emulator (plain HTTP, a dummy token)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                          "namespace": namespace}}],
        }
        path.write_text(json.dumps(config))
        return path

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iter_lines(chunks: Iterable[bytes]) -> Iterable[Obj]:
    """Decode a JSON-lines watch stream (for tests reading it with a plain HTTP client)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
