"""The models: building models and tokenizers from a config or a checkpoint (``build``), FSDP2
sharding with load-once weights (``sharding``), per-sequence log-probs through the chunked head
(``scoring``), the memory plan of ``trdpo plan`` (``memory``) and the sharding diagnostic for a new
cluster (``fsdp_check``)."""
