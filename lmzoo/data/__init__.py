"""Data for training: read documents, tokenise once into a cached memory-mapped file, pack into
fixed-length rows that know their documents, and draw batches in a resumable order.

    files --read_documents--> documents --tokenize_files--> TokenFile (.bin memmap, cached by hash)
          --PackedRows--> rows of seq_len (input_ids, doc_ids, position_ids) --Batches--> batches

``pretraining_batches`` does all of it for a list of files (or the built-in corpus) and returns the
training and validation iterators the training loop takes. See docs/data.md.
"""

from __future__ import annotations

from lmzoo.data.builtin import builtin_corpus, pydoc_documents
from lmzoo.data.packing import PackedRows, split_tokens
from lmzoo.data.readers import READERS, read_documents
from lmzoo.data.sampler import Batches
from lmzoo.data.tasks import TASKS, Task, check, make_tasks
from lmzoo.data.token_file import TokenFile, tokenize_files, tokenize_texts

__all__ = ["read_documents", "READERS", "TokenFile", "tokenize_files", "tokenize_texts", "PackedRows",
           "split_tokens", "Batches", "builtin_corpus", "pydoc_documents", "make_tasks", "check", "Task", "TASKS",
           "pretraining_batches"]


def pretraining_batches(tokenizer, seq_len: int, batch_size: int, *, files=None, texts=None, field=None,
                        val_fraction: float = 0.05, seed: int = 0, transform=None, rank: int = 0,
                        world_size: int = 1, cache_dir=None, progress: bool = False):
    """(train, eval_batches, token_file) from ``files`` (paths in any readable format) or ``texts``
    (in-memory documents): ``train`` is an endless shuffled ``Batches`` over the training rows;
    ``eval_batches()`` returns a fresh one-pass ``Batches`` over the validation rows (the last
    ``val_fraction`` of the tokens), as the training loop's evaluation wants it."""
    if (files is None) == (texts is None):
        from lmzoo.errors import LmzooError

        raise LmzooError("pretraining_batches needs exactly one of files= or texts=")
    if files is not None:
        tf = tokenize_files(files, tokenizer, field=field, cache_dir=cache_dir, progress=progress)
    else:
        tf = tokenize_texts(texts, tokenizer, cache_dir=cache_dir, progress=progress)
    train_span, val_span = split_tokens(tf, val_fraction, seq_len)
    train = Batches(PackedRows(tf, seq_len, train_span), batch_size, seed=seed, transform=transform, rank=rank,
                    world_size=world_size)
    val_rows = PackedRows(tf, seq_len, val_span)

    def eval_batches() -> Batches:
        return Batches(val_rows, min(batch_size, len(val_rows)), shuffle=False, epochs=1, seed=seed,
                       transform=transform, drop_last=False)

    return train, eval_batches, tf
