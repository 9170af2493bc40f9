"""Only for what pyproject.toml cannot say: the cffi-built modules, kvmiso.kvm._vcpu (Vcpu's KVM_RUN
and kick signal) and kvmiso.bench._runloop (the compiled KVM_RUN loop, which includes the first),
and guests/ shipped inside the package.

guests/ stays at the top of the checkout (the repository's layout; an editable install reads it
there). A wheel has no checkout around it, so the build copies guests/ to ``kvmiso/guests``:
the payload sources, the shared includes, the three crt0s and the linker script, which is everything
``kvmiso.guest.build`` needs to assemble a payload on the user's machine.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithGuests(build_py):
    """build_py, plus guests/ copied into the built package (not for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # kvmiso.guest.build finds guests/ in the checkout
        dst = Path(self.build_lib) / "kvmiso" / "guests"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(HERE / "guests", dst, ignore=shutil.ignore_patterns("*.o", "*.bin", "*.elf"))


setup(cffi_modules=["kvmiso/kvm/_build.py:ffibuilder", "kvmiso/bench/_build.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithGuests})
