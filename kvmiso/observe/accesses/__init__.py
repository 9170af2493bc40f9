"""The access record of ``kvmiso boot --record-accesses``, read back (:mod:`.accessrecord`) and
symbolized per window (:mod:`.accesssummary`); the marks ``kvmiso record`` leaves in it
(:mod:`.recordmark`) and the guest runs they cut it into (:mod:`.recordruns`)."""
