"""Reading the running kernel: memory through unattached BPF programs (:mod:`.bpf`), types from
BTF (:mod:`.btf`), symbols (:mod:`.kallsyms`), the real objects of a VM (:mod:`.kobject`,
:mod:`.vmobjects`, :mod:`.kernelfacts`), live page-table leaves (:mod:`.livemm`), and all of it for
one VM, each fact with its source (:mod:`.evidence`)."""
