"""Tracing kvm events: the private tracefs instance (:mod:`.tracefs`, :mod:`.tracefsmount`), event
formats and their ``print fmt`` (:mod:`.traceformat`, :mod:`.printfmt`), ring-buffer pages
(:mod:`.ringbuffer`), the unified exit log and its ``perf kvm stat`` view (:mod:`.exitlog`,
:mod:`.exitstat`), a capture session over KVM_RUN calls (:mod:`.capture`), and the watch of
another process's vCPU threads (:mod:`.attach`), through tracefs or through BPF programs on the
tracepoints (:mod:`.bpfwatch`)."""

TRACERS = ("bpf", "tracefs")  # what a watch can record through, the default first (kept here: the CLI's choices)
