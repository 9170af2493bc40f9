"""Only for what pyproject.toml cannot say: the cffi-built KVM_RUN loop (kvmiso.bench._runloop)."""

from setuptools import setup

setup(cffi_modules=["kvmiso/bench/_build.py:ffibuilder"])
