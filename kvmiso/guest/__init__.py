"""Putting payloads into VMs: build, mode setup, the Machine and the ucall convention."""

from .build import BuildError, Image, available_payloads, build
from .deadline import GuestTimeout
from .machine import Machine
from .result import Outcome, RunResult
from .ucall import Done, Fail, GuestException, Report

__all__ = ["BuildError", "Done", "Fail", "GuestException", "GuestTimeout", "Image", "Machine", "Outcome", "Report",
           "RunResult", "available_payloads", "build"]
