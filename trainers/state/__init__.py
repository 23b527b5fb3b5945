"""What a run leaves in its storage: the storage itself (paths and object stores, ``storage``),
sharded checkpoints (``checkpoint``), the exported Hugging Face model (``export``) and the
fingerprint that decides whether a rerun continues a run (``fingerprint``)."""
