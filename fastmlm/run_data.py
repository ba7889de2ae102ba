"""A training run's data, from text or from a shard folder: tokenizer, batch stream, validation, token counts.

    --data TEXT ...  tokenised as it streams (fastmlm.data.BatchStream); a resume re-reads its epoch
    --data DIR       a shard folder (fastmlm prepare-data): fastmlm.shard_stream.ShardStream, no replay

Either way the stream is read through a :class:`fastmlm.prefetch.Prefetcher`. With a shard
folder and no ``--valid-data``, the held-out validation slice is cut from the shards' documents
by the rule :class:`fastmlm.corpus_reader.HeldOut` applies to text, so it is the same documents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import data, run_dir
from .config import TrainConfig
from .corpus_reader import training_sources
from .distributed import Dist
from .prefetch import Prefetcher
from .shard_stream import ShardStream
from .shards import TOKENIZER, ShardSet, iter_doc_rows, shard_folder
from .tokenizer import load_tokenizer

UNIGRAM_DOCUMENTS = 10_000  # documents counted for unigram_bias (the whole bundled corpus: 4,266)


class RunData:
    """Where a run's text comes from: ``shards`` (a ShardSet) or text files (``train_files``, ``valid_files``)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        folder = shard_folder(cfg.data)
        self.shards = ShardSet(folder) if folder is not None else None
        if self.shards is not None:
            self.train_docs = self.shards.select("train", 0.0 if cfg.valid_data else cfg.valid_holdout)
            self.train_files, self.valid_files = None, list(cfg.valid_data) if cfg.valid_data else None
        else:
            self.train_files, self.valid_files = training_sources(cfg.data, cfg.valid_data, cfg.valid_holdout)

    def tokenizer(self, resume_from: Optional[Path], ranks: Dist):
        """The run's tokenizer: the checkpoint's on resume, else --tokenizer, else the shard folder's, else
        one trained on the text; ValueError when the shards were made with another one."""
        if resume_from is not None:
            tokenizer = load_tokenizer(resume_from / "tokenizer.json")
        elif self.shards is not None and not self.cfg.tokenizer:
            tokenizer = load_tokenizer(self.shards.folder / TOKENIZER)
        else:
            tokenizer = run_dir.prepare_tokenizer(self.cfg, self.train_files, ranks)
        if self.shards is not None:
            self.shards.check_tokenizer(tokenizer, "the checkpoint's tokenizer" if resume_from else
                                        f"--tokenizer {self.cfg.tokenizer}" if self.cfg.tokenizer else "its own")
        return tokenizer

    def unigram_counts(self, tokenizer) -> np.ndarray:
        if self.shards is not None:
            return self.shards.unigram_counts(self.train_docs[:UNIGRAM_DOCUMENTS])
        return data.unigram_counts(self.train_files, tokenizer, max_documents=UNIGRAM_DOCUMENTS)

    def stream(self, tokenizer, collator, ranks: Dist, start: int, epoch_batches: Optional[int]) -> Prefetcher:
        """The training batches from batch ``start`` on, made ahead on a background thread."""
        seed = self.cfg.seed
        if self.shards is not None:
            stream = ShardStream(self.shards, self.train_docs, collator, seed, ranks.rank, ranks.world_size, start)
        else:
            stream = data.BatchStream(self.train_files, tokenizer, collator, seed=seed, rank=ranks.rank,
                                      world_size=ranks.world_size, start=start, epoch_batches=epoch_batches)
        return Prefetcher(stream)

    def validation(self, tokenizer, collator, ranks: Dist) -> list:
        """The fixed validation batches (empty without validation)."""
        max_batches = self.cfg.eval_batches
        if self.shards is not None and not self.valid_files:
            if not self.cfg.valid_holdout:
                return []
            docs = self.shards.select("valid", self.cfg.valid_holdout)[ranks.rank::ranks.world_size]
            special = collator.special
            rows = iter_doc_rows(self.shards, docs, collator.seq_len, special.cls, special.sep)
            return data.fixed_batches(rows, collator, 1234, max_batches,
                                      f"the held-out slice of {self.shards.folder}", ranks.rank)
        if not self.valid_files:
            return []
        return data.eval_batches(self.valid_files, tokenizer, collator, max_batches=max_batches, rank=ranks.rank,
                                 world_size=ranks.world_size)

    def describe_validation(self) -> Optional[str]:
        """What the validation text is, when it was cut from --data (else None: the user named it)."""
        if self.cfg.data is None or self.cfg.valid_data:
            return None
        if self.shards is not None:
            return (f"the held-out slice ({self.cfg.valid_holdout:.3g} of the documents) of {self.shards.folder}"
                    if self.cfg.valid_holdout else None)
        return str(self.valid_files) if self.valid_files is not None else None
