"""The data layer: tokenizer, verifiable tasks, corpora and packed token shards (no model code)."""

from nanoseek.data.corpus import builtin_corpus, read_corpus
from nanoseek.data.shards import PackedDataset, tokenize_to_shards
from nanoseek.data.tasks import TASKS, Example, Task, check_answer, get_task, load_jsonl_task
from nanoseek.data.tokenizer import StreamDecoder, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "builtin_corpus", "read_corpus", "PackedDataset", "tokenize_to_shards", "TASKS", "Example", "Task",
    "check_answer", "get_task", "load_jsonl_task", "StreamDecoder", "Tokenizer", "load_tokenizer", "train_tokenizer",
]
