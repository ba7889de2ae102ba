"""End-to-end CPU training throughput of the demo-bert configuration: fastmlm against Hugging Face.

    python -m benchmarks.bench_train_demo [--steps 20] [--rounds 3] [--threads N]

Both sides train the same BERT architecture (the demo-bert preset's model config, mapped onto
``BertConfig``) on the same packed rows of the bundled corpus with the same batch shape:

  fastmlm   BatchStream + MaskingCollator (static masked_positions) -> FastMLMForMaskedLM -> AdamW
  hf        the same rows -> transformers DataCollatorForLanguageModeling (15%, 80/10/10)
            -> BertForMaskedLM (sdpa attention) -> AdamW

Each round times ``--steps`` optimizer steps per side, alternating sides so that load
from other processes hits both alike; the median round is reported. The loaders are
also timed alone (no model), to show data loading is not the bottleneck: ours from the
files (read, tokenise, pack, mask), Hugging Face's collator on already packed rows (its
masking and padding only). tokens/s counts
the real tokens of each batch. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import numpy as np
import torch


def _hf_side(cfg, model_cfg, tokenizer, rows):
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    from fastmlm.hf import config_to_hf

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    collate = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=cfg.mask_rate, return_tensors="pt")
    hf_cfg = {k: v for k, v in config_to_hf(model_cfg).items() if k not in ("architectures", "model_type")}
    model = BertForMaskedLM(BertConfig(**hf_cfg, attn_implementation="sdpa"))
    examples = [{"input_ids": np.concatenate(r.segments).tolist()} for r in rows]
    batches = (collate(examples[i:i + cfg.batch_size]) for i in itertools.count(0, cfg.batch_size))
    return model, batches


def main(argv=None) -> int:
    from fastmlm import data
    from fastmlm.config import train_preset
    from fastmlm.corpus_reader import bundled_corpus, read_documents
    from fastmlm.model import FastMLMForMaskedLM
    from fastmlm.tokenizer import load_tokenizer, train_tokenizer
    from fastmlm.train import make_optimizer, model_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train one on the bundled corpus)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = train_preset("demo-bert")  # the demo preset has a window layer, which BertForMaskedLM lacks
    train_files = [bundled_corpus("train")]
    tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer
                 else train_tokenizer(read_documents(train_files), cfg.vocab_size))
    model_cfg = model_config(cfg, tokenizer)
    collator = data.MaskingCollator(tokenizer, cfg.seq_len, cfg.batch_size, cfg.mask_rate)
    needed = (args.steps * (args.rounds + 1) + 1) * cfg.batch_size

    # loaders alone: the first batch waits for the shuffle buffer (timed apart), then steady state
    start = time.perf_counter()
    stream = iter(data.BatchStream(train_files, tokenizer, collator))
    ours = [next(stream)]
    loader_startup_s = time.perf_counter() - start
    start = time.perf_counter()
    ours += [next(stream) for _ in range(max(200, args.steps * (args.rounds + 1)))]
    loader_fastmlm = sum(b.n_tokens for b in ours[1:]) / (time.perf_counter() - start)
    rows = list(itertools.islice(data.iter_rows(read_documents(train_files), tokenizer, cfg.seq_len), needed))
    hf_model, hf_batches = _hf_side(cfg, model_cfg, tokenizer, rows)
    start = time.perf_counter()
    theirs = [next(hf_batches) for _ in range(args.steps * (args.rounds + 1))]
    loader_hf = sum(int(b["attention_mask"].sum()) for b in theirs) / (time.perf_counter() - start)

    torch.manual_seed(0)
    model = FastMLMForMaskedLM(model_cfg)
    opt, hf_opt = make_optimizer(model, cfg), make_optimizer(hf_model, cfg)

    def fastmlm_step(batch):
        model(**batch.model_inputs()).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return batch.n_tokens

    def hf_step(batch):
        hf_model(**batch).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    rates = {"fastmlm": [], "hf": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, step, batches in (("fastmlm", fastmlm_step, ours), ("hf", hf_step, theirs)):
            chunk = batches[r * args.steps:(r + 1) * args.steps]
            start = time.perf_counter()
            tokens = sum(step(b) for b in chunk)
            if r:
                rates[name].append(tokens / (time.perf_counter() - start))
    result = {
        "config": {"model": cfg.model, "model_overrides": cfg.model_overrides, "batch": cfg.batch_size,
                   "seq_len": cfg.seq_len, "vocab": model_cfg.vocab_size},
        "train_tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "train_tokens_per_s_rounds": rates,
        "loader_tokens_per_s": {"fastmlm": loader_fastmlm, "hf_collator": loader_hf},
        "loader_first_batch_s": loader_startup_s,
        "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    result["speedup"] = result["train_tokens_per_s"]["fastmlm"] / result["train_tokens_per_s"]["hf"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
