"""Data (below the objectives): tokenizers, the synthetic corpus, records and batch streams, ``collate``
(the one batching rule) and the one small-Llama builder. Knows nothing of objectives or training."""
from .collate import collate
from .streams import BatchStream, read_records, tokenize_records
from .tokenizer import CharTokenizer, WordTokenizer

__all__ = ["collate", "BatchStream", "read_records", "tokenize_records", "CharTokenizer", "WordTokenizer"]
