"""Reading InfluenceJob documents (YAML files or dicts) with one-line, field-naming errors."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError
from .spec import METHOD_SPECS, QUANTITY, InfluenceJob, InfluenceJobSpec

_MAX_ERRORS = 4
#: old or mangled keys of a data source, and what to write instead
_DATA_KEY_HINTS = {
    "x": "name the features array with `features:`",
    "y": "name the targets array with `targets:`",
    "true": "YAML 1.1, as kubectl reads it, turns a bare `y:` key into true; use `targets:`",
}


def parse_job(doc: Any, source: str = "job") -> InfluenceJob:
    """Validate a decoded document (camelCase keys, as in YAML) into an InfluenceJob."""
    if not isinstance(doc, Mapping):
        raise SpecError(f"{source}: expected an InfluenceJob mapping (apiVersion, kind, metadata, spec), got {type(doc).__name__}")
    try:
        return InfluenceJob.model_validate(dict(doc), by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(f"{source}: {format_validation_error(err)}") from None


def parse_spec(spec: Any, source: str = "spec") -> InfluenceJobSpec:
    """Validate the `spec` part alone (what the operator reads from a resource)."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"{source}: expected a mapping, got {type(spec).__name__}")
    try:
        return InfluenceJobSpec.model_validate(dict(spec), by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(f"{source}: {format_validation_error(err, root=InfluenceJobSpec, prefix='spec')}") from None


def read_job(path: Union[str, Path]) -> InfluenceJob:
    """Read and validate an InfluenceJob YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{path}: not valid YAML{where}: {problem}") from None
    if len(docs) != 1:
        raise SpecError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    return parse_job(docs[0], str(path))


def dump_job(job: InfluenceJob) -> dict[str, Any]:
    """The job as a camelCase dict (what `kubectl apply` would send)."""
    return job.model_dump(by_alias=True, mode="json", exclude_none=True)


# ------------------------------------------------------------------------------ errors


def _models_in(annotation: Any) -> list[Any]:
    """The BaseModel classes an annotation can hold, and whether it is a list of them."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    if origin is list:
        return [("list", m) for m in _models_in(typing.get_args(annotation)[0])]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _alias_map(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[str], Optional[type[BaseModel]], int, Any]:
    """Follow an error location through the models: (path parts, model reached, items used, field)."""
    parts: list[str] = []
    current: Any = root
    field = None
    used = 0
    for el in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = _alias_map(current)
            if not isinstance(el, str) or el not in fields:
                break
            parts.append(el)
            field = fields[el]
            held = _models_in(field.annotation)
            used += 1
            if len(held) == 1 and not isinstance(held[0], tuple):
                current = held[0]
            elif held and all(isinstance(h, tuple) for h in held):
                current = ("list", held[0][1])
            elif len(held) > 1:
                current = "tagged"
            else:
                current = None
        elif current == "tagged" and isinstance(el, str) and el in METHOD_SPECS:
            current = METHOD_SPECS[el]
            used += 1
        elif isinstance(current, tuple) and isinstance(el, int):
            parts[-1] += f"[{el}]"
            current = current[1]
            used += 1
        else:
            break
    return parts, current if isinstance(current, type) else None, used, field


def format_validation_error(
    err: ValidationError, root: type[BaseModel] = InfluenceJob, prefix: str = ""
) -> str:
    """pydantic's errors as one line: `field.path: what is wrong; field.path: ...`."""
    grouped: dict[str, list[str]] = {}
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        parts, model, used, field = _walk(loc, root)
        kind = e["type"]
        msg = e["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden" and model is not None and used == len(loc) - 1:
            name = str(loc[-1])
            options = sorted(a for a in _alias_map(model) if a != "name")
            parts.append(name)
            method = _method_name(model)
            if method:
                msg = f"not an option of method {method!r}; its options are {', '.join(options)}"
            else:
                msg = f"unknown field; expected one of {', '.join(options)}"
                if name in _DATA_KEY_HINTS and "targets" in options:
                    msg += f" ({_DATA_KEY_HINTS[name]})"
        elif kind == "union_tag_invalid":
            ctx = e.get("ctx", {})
            parts.append(str(ctx.get("discriminator", "name")).strip("'"))
            msg = f"unknown method {ctx.get('tag')!r}; expected one of {', '.join(METHOD_SPECS)}"
        elif kind == "union_tag_not_found":
            parts.append("name")
            msg = f"missing; expected one of {', '.join(METHOD_SPECS)}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "string_pattern_mismatch" and e.get("ctx", {}).get("pattern") == QUANTITY:
            msg = f"invalid value {e.get('input')!r}; expected a Kubernetes quantity such as '2', '500m' or '4Gi'"
        elif (kind == "string_pattern_mismatch" or used < len(loc)) and field is not None and field.description and model is None:
            msg = f"invalid value {e.get('input')!r}; expected {field.description[0].lower()}{field.description[1:]}"
        elif isinstance(e.get("input"), (int, float, str, bool)) and kind != "value_error":
            msg = f"{msg} (got {e['input']!r})"
        path = ".".join(([prefix] if prefix else []) + parts) or "document"
        bucket = grouped.setdefault(path, [])
        if msg not in bucket:
            bucket.append(msg)
    items = [f"{path}: {' / '.join(msgs[:1] if len(msgs) > 1 and 'expected' in msgs[0] else msgs)}" for path, msgs in grouped.items()]
    more = len(items) - _MAX_ERRORS
    text = "; ".join(items[:_MAX_ERRORS])
    return text + (f" (and {more} more)" if more > 0 else "")


def _method_name(model: type[BaseModel]) -> Optional[str]:
    for name, cls in METHOD_SPECS.items():
        if cls is model:
            return name
    return None


def resolve_relative_paths(job: InfluenceJob, base: Union[str, Path]) -> InfluenceJob:
    """The job with relative local paths (data, weights, program, output) made relative to `base`
    (the job file's folder): what `kinfluence run` does, so a job runs from any directory."""
    from .spec import url_scheme

    base = Path(base).resolve()

    def fix(url: Optional[str]) -> Optional[str]:
        if url is None or url_scheme(url) != "" or Path(url).is_absolute():
            return url
        return str(base / url)

    spec = job.spec
    model = spec.model.model_copy(update={"weights": fix(spec.model.weights), "program": fix(spec.model.program)})
    data = spec.data.model_copy(
        update={
            "train": spec.data.train.model_copy(update={"url": fix(spec.data.train.url)}),
            "test": spec.data.test.model_copy(update={"url": fix(spec.data.test.url)}),
        }
    )
    output = spec.output.model_copy(update={"url": fix(spec.output.url)})
    return job.model_copy(update={"spec": spec.model_copy(update={"model": model, "data": data, "output": output})})
