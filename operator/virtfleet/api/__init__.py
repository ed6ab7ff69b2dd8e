"""API models of virtfleet.io/v1alpha1: the single source of the CRD schemas."""

from virtfleet.api.conditions import Condition, ConditionStatus, ConditionType
from virtfleet.api.migration import VMMigrationSpec, VMMigrationStatus
from virtfleet.api.quantity import Quantity
from virtfleet.api.resources import KINDS, KINDS_BY_NAME, Kind, Resource, resource_model
from virtfleet.api.snapshot import VMRestoreSpec, VMRestoreStatus, VMSnapshotSpec, VMSnapshotStatus
from virtfleet.api.virtualmachine import VirtualMachineSpec, VirtualMachineStatus
from virtfleet.api.vmhost import VMHostSpec, VMHostStatus

__all__ = [
    "KINDS",
    "KINDS_BY_NAME",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "Kind",
    "Quantity",
    "Resource",
    "VMHostSpec",
    "VMHostStatus",
    "VMMigrationSpec",
    "VMMigrationStatus",
    "VMRestoreSpec",
    "VMRestoreStatus",
    "VMSnapshotSpec",
    "VMSnapshotStatus",
    "VirtualMachineSpec",
    "VirtualMachineStatus",
    "resource_model",
]
