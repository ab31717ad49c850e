"""Wire schemas shared by the coordinator, workers and clients (pydantic v2)."""

from csml.schemas.apps import (
    AppInfo,
    AppManifest,
    FileSpec,
    ModelFormat,
    OperationInfo,
    QueueInfo,
)
from csml.schemas.confidential import (
    ClaimedConfidential,
    ConfidentialSpec,
    EncryptedResult,
    Recipient,
    WorkerAttestation,
    WorkerKeyInfo,
)
from csml.schemas.errors import ErrorBody, ErrorDetail
from csml.schemas.identities import IdentityCreated, IdentityInfo, JoinTokenCreated, JoinTokenInfo
from csml.schemas.jobs import (
    FileInfo,
    Job,
    JobList,
    JobSpec,
    JobState,
    LimitsRequest,
    Progress,
    StepStatus,
)
from csml.schemas.pipelines import PipelineSpec, StepSpec
from csml.schemas.workers import (
    ClaimedJob,
    ClaimResponse,
    Heartbeat,
    HeartbeatResponse,
    JobCompletion,
    JobLimits,
    RunningJob,
    WorkerInfo,
    WorkerRegistered,
    WorkerRegistration,
)

__all__ = [
    "AppInfo",
    "AppManifest",
    "ClaimResponse",
    "ClaimedConfidential",
    "ClaimedJob",
    "ConfidentialSpec",
    "EncryptedResult",
    "ErrorBody",
    "ErrorDetail",
    "FileInfo",
    "FileSpec",
    "Heartbeat",
    "HeartbeatResponse",
    "IdentityCreated",
    "IdentityInfo",
    "Job",
    "JobCompletion",
    "JobLimits",
    "JobList",
    "JobSpec",
    "JobState",
    "JoinTokenCreated",
    "JoinTokenInfo",
    "LimitsRequest",
    "ModelFormat",
    "OperationInfo",
    "PipelineSpec",
    "Progress",
    "QueueInfo",
    "Recipient",
    "RunningJob",
    "StepSpec",
    "StepStatus",
    "WorkerAttestation",
    "WorkerInfo",
    "WorkerKeyInfo",
    "WorkerRegistered",
    "WorkerRegistration",
]
