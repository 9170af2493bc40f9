"""The access record of ``kvmiso boot --record-accesses``, read back (:mod:`.accessrecord`) and
symbolized per window (:mod:`.accesssummary`)."""
