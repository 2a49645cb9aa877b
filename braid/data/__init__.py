"""Corpora, tokenizers, packing into fixed-length sequences, and the sharded, resumable batch order."""
