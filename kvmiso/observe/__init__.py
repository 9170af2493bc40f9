"""Facts from the running kernel, no judgement, in four parts:

- :mod:`.tracing`: the private tracefs instance, its formats and ring buffer, the exit log and
  its summary, a capture session, and the watch of another process's vCPU threads;
- :mod:`.kernel`: reading the kernel itself: kernel memory through BPF, BTF, kallsyms, the real
  objects of a VM and their live page-table leaves, all gathered as :class:`Evidence`;
- :mod:`.foreign`: another process: its KVM file descriptors, its threads, copies of its vCPU fds;
- :mod:`.accesses`: the access record of ``kvmiso boot --record-accesses``, read back.

Nothing here runs a guest (that is :mod:`kvmiso.session`'s) or judges what it saw (that is
:mod:`kvmiso.isolation`'s).
"""
