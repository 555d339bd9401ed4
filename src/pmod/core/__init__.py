"""What every routing method shares, and nothing model- or method-specific: the method-config base, retention
schedules, compaction of the processed tokens, the routed decoder layer, its KV cache, routing records, and
``convert`` / ``load``, which put a backbone adapter and a method together."""
