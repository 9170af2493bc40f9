"""The subcommands of ``kvmiso``, one module each."""
