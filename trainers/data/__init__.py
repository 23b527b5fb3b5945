"""The data: reading rows in their real formats and tokenizing them (``loading``), the types they
become (``types``), the tokenized cache (``token_cache``), data order, micro-batches and packed or
padded rows (``batching``), and the bundled synthetic task (``synthetic``)."""
