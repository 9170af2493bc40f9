"""Ports of the upstream KVM selftests (tools/testing/selftests/kvm, Linux 6.12) to kvmiso: one
file each, every upstream assertion kept and mapped in the file's docstring. ``kvmiso
conformance`` runs them and prints the deviations of this host's vendor module."""
