"""The end-to-end harness: a real control plane, real libvirt nodes, a real guest."""
