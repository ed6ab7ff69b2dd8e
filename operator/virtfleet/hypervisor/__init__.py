"""virtfleet.hypervisor"""
