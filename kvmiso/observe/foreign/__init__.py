"""Another process: its KVM file descriptors (``/proc/PID/fd``), its threads, and copies of its
vCPU fds in this process (:mod:`.vms`)."""
