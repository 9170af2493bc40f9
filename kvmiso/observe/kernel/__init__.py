"""Reading the running kernel: memory through unattached BPF programs (:mod:`.bpf`), the watch's
tracepoint programs (:mod:`.bpfprog`) and the maps and perf events they hang on
(:mod:`.bpfmaps`), types from BTF (:mod:`.btf`) and the members an offset falls in
(:mod:`.btffields`), symbols (:mod:`.kallsyms`), the real objects of a VM (:mod:`.kobject`,
:mod:`.vmobjects`, :mod:`.kernelfacts`), live page-table leaves (:mod:`.livemm`), and all of it for
one VM, each fact with its source (:mod:`.evidence`)."""
