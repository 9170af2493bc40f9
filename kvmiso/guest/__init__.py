"""Putting payloads into VMs: build, mode setup, the Machine and the ucall convention."""

from .build import BuildError, Image, Source, available_payloads, build
from .deadline import GuestTimeout
from .machine import Machine
from .result import GuestAssertionError, GuestError, Outcome, RunResult
from .ucall import Done, Fail, GuestAssertion, GuestException, Printf, Report, Sync

__all__ = ["BuildError", "Done", "Fail", "GuestAssertion", "GuestAssertionError", "GuestError", "GuestException",
           "GuestTimeout", "Image", "Machine", "Outcome", "Printf", "Report", "RunResult", "Source", "Sync",
           "available_payloads", "build"]
