"""The InfluenceJob resource: ONE pydantic model, the single source of truth.

`kinfluence run` reads it from YAML, the operator validates with it, and the CRD's
openAPIV3Schema is generated from it (`kinfluence.job.crd`). Field names are camelCase
in YAML (snake_case in Python); unknown fields are errors.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kinfluence.dev"
API_VERSION = "v1alpha1"
KIND = "InfluenceJob"

#: URL schemes accepted for data, weights, programs and outputs ("" is a local path)
LOCAL_SCHEMES = ("", "file", "local")

_ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_NAMED_LOSSES = ("cross_entropy", "mse", "nll", "bce_with_logits")
_LOSS = rf"^({'|'.join(_NAMED_LOSSES)})$|{_ENTRYPOINT}"
# Kubernetes resource.Quantity, as the API server checks it
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def url_scheme(url: str) -> str:
    """The URL's scheme ('' for a plain local path); a chained URL reports its outer scheme."""
    if re.match(r"^[A-Za-z]:[\\/]", url):  # a Windows drive letter is a path
        return ""
    return urlsplit(url.split("::", 1)[0]).scheme.lower()


def check_url(url: str) -> str:
    """Refuse empty URLs and schemes fsspec has no implementation for."""
    import fsspec

    if not url or not url.strip():
        raise ValueError("expected a URL or a local path, got an empty string")
    scheme = url_scheme(url)
    if scheme in LOCAL_SCHEMES:
        return url
    known = set(fsspec.available_protocols())
    if scheme not in known:
        raise ValueError(
            f"unsupported URL scheme {scheme!r} in {url!r}; use a local path or an fsspec URL "
            "such as file://, gs://, s3://, az://, memory://"
        )
    return url


#: a local path or an fsspec URL whose scheme this installation can open
Url = Annotated[str, Field(min_length=1), AfterValidator(check_url)]
StorageOptions = Annotated[
    dict[str, Any],
    Field(
        description="Options passed to the fsspec filesystem (e.g. {token: anon}); credentials "
        "normally come from the environment.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    ),
]


class SpecModel(BaseModel):
    """Shared configuration: camelCase aliases, unknown fields forbidden, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# --------------------------------------------------------------------------------- model


class ModelSource(SpecModel):
    """Where the network comes from: an entrypoint (+ weights), or a torch.export program."""

    entrypoint: Optional[str] = Field(
        None,
        pattern=_ENTRYPOINT,
        description="Python callable `package.module:function` that returns a torch.nn.Module "
        "(the architecture; the module must be importable on every worker).",
    )
    weights: Optional[Url] = Field(
        None,
        description="URL of a state_dict saved with torch.save, loaded with "
        "torch.load(weights_only=True) into the entrypoint's module. Without it the module "
        "is used as the entrypoint returns it.",
    )
    program: Optional[Url] = Field(
        None,
        description="URL of a torch.export program (torch.export.save, exported with a dynamic batch "
        "dimension); alternative to entrypoint.",
    )
    storage_options: StorageOptions = {}
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="Floating point precision of the computation and of the stored results."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where workers compute: auto takes a GPU when the worker has one."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.entrypoint is None) == (self.program is None):
            raise ValueError("give exactly one of entrypoint (with optional weights) or program")
        if self.program is not None and self.weights is not None:
            raise ValueError("weights: not used with program (a torch.export program holds its weights)")
        return self


# --------------------------------------------------------------------------------- data


class DataSource(SpecModel):
    """One data set: a zarr group (or a folder of .npy files) and the names of its two arrays.

    The keys are `features` and `targets`, not `x` and `y`: YAML 1.1 (kubectl's parser) reads a
    bare `y` key as the boolean true.
    """

    url: Url = Field(description="URL of a zarr group, or of a folder holding <features>.npy and <targets>.npy.")
    format: Literal["zarr", "npy"] = Field("zarr", description="zarr group or .npy files.")
    features: str = Field("x", min_length=1, description="Name of the features array (first axis: points).")
    targets: str = Field("y", min_length=1, description="Name of the targets array (first axis: points).")
    start: Optional[int] = Field(None, ge=0, description="First point used (inclusive).")
    stop: Optional[int] = Field(None, ge=1, description="Last point used (exclusive).")
    storage_options: StorageOptions = {}

    @model_validator(mode="after")
    def _range(self) -> "DataSource":
        if self.start is not None and self.stop is not None and self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be smaller than stop ({self.stop})")
        return self


class DataSpec(SpecModel):
    """Training points (influence of) and test points (influence on)."""

    train: DataSource = Field(description="The training data: columns of the influence matrix.")
    test: DataSource = Field(description="The test data: rows of the influence matrix.")


# --------------------------------------------------------------------------------- method

Regularization = Union[Annotated[float, Field(ge=0)], dict[str, Annotated[float, Field(ge=0)]]]
Blocks = Union[Literal["full", "layer_wise", "parameter_wise"], dict[str, list[str]]]


class MethodBase(SpecModel):
    """Options every influence method has."""

    second_order: Literal["hessian", "gauss_newton"] = Field(
        "hessian", description="Curvature: the Hessian, or the Gauss-Newton matrix J^T H_out J."
    )
    regularization: Regularization = Field(
        0.0,
        description="lambda added to the curvature: a number >= 0, or a map block name -> number.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    blocks: Blocks = Field(
        "full",
        description="Block structure of the curvature: full, layer_wise, parameter_wise, or a map "
        "block name -> list of parameter names.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    def common_kwargs(self) -> dict[str, Any]:
        """Constructor arguments shared by all methods."""
        return {
            "regularization": self.regularization,
            "second_order_mode": self.second_order,
            "block_structure": self.blocks,
        }

    def options(self) -> dict[str, Any]:
        """The method-specific constructor arguments."""
        return {}


class DirectMethod(MethodBase):
    """Exact influence through the explicit (block) curvature matrix; small models only."""

    name: Literal["direct"]
    max_parameters: int = Field(
        20_000, gt=0, description="Refuse blocks with more parameters (the matrix is p x p)."
    )

    def options(self) -> dict[str, Any]:
        return {"max_parameters": self.max_parameters}


class CgMethod(MethodBase):
    """Conjugate gradient solves, matrix-free, optionally preconditioned."""

    name: Literal["cg"]
    rtol: float = Field(1e-7, ge=0, description="Relative residual tolerance.")
    atol: float = Field(1e-7, ge=0, description="Absolute residual tolerance.")
    maxiter: Optional[int] = Field(None, gt=0, description="Iteration limit (default: the block size).")
    use_block_cg: bool = Field(False, description="Share one Krylov space across right-hand sides.")
    preconditioner: Literal["none", "jacobi", "nystroem"] = Field("none", description="Preconditioner.")
    preconditioner_rank: Optional[int] = Field(
        None, gt=0, description="Rank of the Nystroem preconditioner (preconditioner: nystroem)."
    )

    @model_validator(mode="after")
    def _rank_needs_nystroem(self) -> "CgMethod":
        if self.preconditioner_rank is not None and self.preconditioner != "nystroem":
            raise ValueError("preconditionerRank: only used with preconditioner: nystroem")
        return self

    def options(self) -> dict[str, Any]:
        pre: Any = None
        if self.preconditioner == "jacobi":
            from kinfluence.influence.preconditioners import JacobiPreconditioner

            pre = JacobiPreconditioner()
        elif self.preconditioner == "nystroem":
            from kinfluence.influence.preconditioners import NystroemPreconditioner

            pre = NystroemPreconditioner(**({"rank": self.preconditioner_rank} if self.preconditioner_rank else {}))
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "maxiter": self.maxiter,
            "use_block_cg": self.use_block_cg,
            "pre_conditioner": pre,
        }


class LissaMethod(MethodBase):
    """Linear time stochastic second-order approximation (LiSSA) iterations."""

    name: Literal["lissa"]
    maxiter: int = Field(1000, gt=0, description="Iterations of the recursion.")
    dampen: float = Field(0.0, ge=0, lt=1, description="Damping of the recursion, in [0, 1).")
    scale: float = Field(10.0, gt=0, description="Scale: must exceed the largest eigenvalue of H.")
    samples: int = Field(1, gt=0, description="Independent recursions averaged.")
    rtol: float = Field(1e-4, ge=0, description="Stop when the relative change is below this.")

    def options(self) -> dict[str, Any]:
        return {
            "maxiter": self.maxiter,
            "dampen": self.dampen,
            "scale": self.scale,
            "samples": self.samples,
            "rtol": self.rtol,
        }


class ArnoldiMethod(MethodBase):
    """Low-rank approximation of the curvature from an Arnoldi (Lanczos) iteration."""

    name: Literal["arnoldi"]
    rank: int = Field(10, gt=0, description="Number of eigenpairs kept.")
    krylov_dimension: Optional[int] = Field(
        None, gt=0, description="Krylov space dimension (default: twice the rank)."
    )

    @model_validator(mode="after")
    def _krylov_at_least_rank(self) -> "ArnoldiMethod":
        if self.krylov_dimension is not None and self.krylov_dimension < self.rank:
            raise ValueError(f"krylovDimension ({self.krylov_dimension}) must be >= rank ({self.rank})")
        return self

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank}
        if self.krylov_dimension is not None:
            out["krylov_dimension"] = self.krylov_dimension
        return out


class NystroemMethod(MethodBase):
    """Low-rank Nystroem sketch of the curvature."""

    name: Literal["nystroem"]
    rank: int = Field(10, gt=0, description="Sketch rank.")
    seed: int = Field(0, ge=0, description="Seed of the random sketch.")

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank, "seed": self.seed}


class EkfacMethod(MethodBase):
    """Eigenvalue-corrected Kronecker-factored curvature (per layer; Linear layers)."""

    name: Literal["ekfac"]
    update_diagonal: bool = Field(True, description="Refit the eigenvalues in the Kronecker basis.")

    def options(self) -> dict[str, Any]:
        return {"update_diagonal": self.update_diagonal}


MethodSpec = Annotated[
    Union[DirectMethod, CgMethod, LissaMethod, ArnoldiMethod, NystroemMethod, EkfacMethod],
    Field(discriminator="name"),
]
METHOD_SPECS: dict[str, type[MethodBase]] = {
    "direct": DirectMethod,
    "cg": CgMethod,
    "lissa": LissaMethod,
    "arnoldi": ArnoldiMethod,
    "nystroem": NystroemMethod,
    "ekfac": EkfacMethod,
}


# --------------------------------------------------------------------------------- rest


class Chunks(SpecModel):
    """Points per chunk: one block of the output is (test chunk) x (train chunk)."""

    train: int = Field(1024, gt=0, description="Training points per chunk.")
    test: int = Field(256, gt=0, description="Test points per chunk.")


class OutputSpec(SpecModel):
    """Where results go and which ones."""

    url: Url = Field(description="URL of the output zarr store (local path, gs://, s3://, ...).")
    matrix: bool = Field(True, description="Write the full influence matrix n_test x n_train.")
    top_k: Optional[int] = Field(
        None, gt=0, description="Also write the k most helpful and most harmful training points per test point."
    )
    values: Optional[Literal["mean", "sum"]] = Field(
        None, description="Also write a per-training-point data value: the mean or sum of its influence over the test points."
    )
    on_existing: Literal["resume", "overwrite", "fail"] = Field(
        "resume",
        description="When the store exists: resume (skip finished blocks; refused if a different "
        "job wrote it), overwrite (delete and start over), fail.",
    )
    storage_options: StorageOptions = {}

    @model_validator(mode="after")
    def _something(self) -> "OutputSpec":
        if not (self.matrix or self.top_k or self.values):
            raise ValueError("nothing to write: set matrix: true, topK, or values (mean or sum)")
        return self


Quantity = Annotated[
    str,
    Field(
        pattern=QUANTITY,
        json_schema_extra={"x-kubernetes-int-or-string": True},
    ),
]


class Toleration(SpecModel):
    """A Kubernetes toleration for the worker pods."""

    key: Optional[str] = None
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = None
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    toleration_seconds: Optional[int] = None


class EnvVar(SpecModel):
    """An environment variable of the worker and runner containers."""

    name: str = Field(min_length=1)
    value: Optional[str] = None
    value_from: Optional[dict[str, Any]] = Field(
        None,
        description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, ...).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class WorkersSpec(SpecModel):
    """The dask workers of an in-cluster run (ignored by `kinfluence run`, except replicas)."""

    replicas: int = Field(2, ge=1, description="Number of worker pods (each single-threaded).")
    cpu: Optional[Quantity] = Field(None, description="CPU request and limit per worker, e.g. '2' or '500m'.")
    memory: Optional[Quantity] = Field(None, description="Memory request and limit per worker, e.g. '4Gi'.")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu limit per worker.")
    image: Optional[str] = Field(
        None, min_length=1, description="Container image of the runner and workers (default: the operator's)."
    )
    node_selector: dict[str, str] = Field({}, description="Node labels the worker pods require.")
    tolerations: list[Toleration] = Field([], description="Tolerations of the worker pods.")
    env: list[EnvVar] = Field([], description="Extra environment of the runner and workers.")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_as_string(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class RunPolicy(SpecModel):
    """Retries, deadlines and cleanup of an in-cluster run."""

    backoff_limit: int = Field(3, ge=0, description="Failed attempts retried (each resumes from the store).")
    active_deadline_seconds: Optional[int] = Field(
        None, gt=0, description="Fail the job after this many seconds running."
    )
    ttl_seconds_after_finished: Optional[int] = Field(
        None, ge=0, description="Delete the InfluenceJob this long after it finished."
    )
    suspend: bool = Field(False, description="Remove the cluster but keep the output; false resumes.")


class InfluenceJobSpec(SpecModel):
    """What to compute (model, loss, data, method, mode), where to write it, and how to run it."""

    model: ModelSource = Field(description="The trained network.")
    loss: str = Field(
        pattern=_LOSS,
        description="Loss of one batch (mean over the batch): cross_entropy, mse, nll, "
        "bce_with_logits, or an entrypoint `package.module:function` (outputs, targets) -> scalar.",
    )
    data: DataSpec = Field(description="Training and test data.")
    method: MethodSpec = Field(description="Influence method and its options; `name` selects the method.")
    mode: Literal["up", "perturbation"] = Field(
        "up", description="up: up-weighting influence; perturbation: influence of feature perturbations."
    )
    chunks: Chunks = Field(Chunks(), description="Chunk sizes (memory per worker is bounded by these).")
    output: OutputSpec = Field(description="Output store and what to write into it.")
    workers: WorkersSpec = Field(WorkersSpec(), description="Worker resources (in-cluster runs).")
    run_policy: RunPolicy = Field(RunPolicy(), description="Retries, deadline, TTL, suspend (in-cluster runs).")

    @model_validator(mode="after")
    def _perturbation_needs_matrix_only(self) -> "InfluenceJobSpec":
        if self.mode == "perturbation" and (self.output.top_k or self.output.values):
            raise ValueError(
                "output: topK and values are only defined for mode: up (perturbation influences "
                "have a feature axis)"
            )
        return self

    def computation(self) -> dict[str, Any]:
        """The fields that define the result (a fingerprint of these identifies the output)."""
        d = self.model_dump(by_alias=True, mode="json")
        out = {k: d[k] for k in ("model", "loss", "data", "method", "mode", "chunks")}
        out["output"] = {k: d["output"][k] for k in ("matrix", "topK", "values")}
        for src in ("train", "test"):
            out["data"][src].pop("storageOptions", None)
        out["model"].pop("storageOptions", None)
        out["model"].pop("device", None)
        return out


# --------------------------------------------------------------------------------- resource


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata kinfluence reads (the rest is kept as is)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="A Kubernetes name: lowercase letters, digits, '-' and '.', starting and ending alphanumeric.",
    )
    namespace: Optional[str] = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Phase(str, Enum):
    """Lifecycle of an InfluenceJob."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class StatusModel(BaseModel):
    """Status parts: camelCase, extra fields kept (the operator may add its own)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = None
    message: Optional[str] = None
    last_transition_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})


class Progress(StatusModel):
    """Blocks done of the output's (test chunk, train chunk) grid."""

    completed_blocks: int = Field(0, ge=0)
    total_blocks: int = Field(0, ge=0)
    percentage: float = Field(0.0, ge=0, le=100)
    estimated_remaining_seconds: Optional[float] = Field(None, ge=0)
    last_update_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})


class InfluenceJobStatus(StatusModel):
    """Observed state, written by the operator."""

    phase: Optional[Phase] = None
    conditions: list[Condition] = []
    progress: Optional[Progress] = None
    output: Optional[str] = Field(None, description="URL of the output store.")
    cluster_name: Optional[str] = Field(None, description="Name of the dask cluster running the job.")
    dashboard_url: Optional[str] = Field(None, alias="dashboardURL", description="Dask dashboard.")
    start_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    completion_time: Optional[str] = Field(None, json_schema_extra={"format": "date-time"})
    attempts: int = Field(0, ge=0, description="Attempts started (1 + retries).")
    observed_generation: Optional[int] = None


class InfluenceJob(BaseModel):
    """The InfluenceJob custom resource."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["kinfluence.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["InfluenceJob"]
    metadata: ObjectMeta
    spec: InfluenceJobSpec
    status: Optional[InfluenceJobStatus] = None
