"""virtfleet: a declarative, GitOps-native reconciler for libvirt/QEMU virtual machines."""

__version__ = "0.1.0"
