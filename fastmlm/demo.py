"""``fastmlm demo``: train the demo preset on the bundled corpus, then show what it learned.

    tokenizer + training (fastmlm.train) ──► validation accuracy / perplexity
        beside a unigram-frequency baseline on the same masks ──► top-5 fills of a few sentences

The demo preset is chosen for a 2-core CPU and about two minutes (see TRAIN_PRESETS in
fastmlm/config.py for the measured reasons); on a GPU it trains the bigger ``demo-gpu``
preset. The run folder is an ordinary run (``fastmlm fill-mask/eval/plot`` read it), marked
``made_by=demo`` so that a later demo may replace it but never a ``fastmlm train`` run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

# Sentences in the corpus's own register, with the answers a reader expects in the top 5.
DEMO_SENTENCES = (
    "A [MASK] is an ordered collection of items.",  # list / sequence / tuple
    "The for [MASK] iterates over the items of a sequence.",  # loop / statement
    "If the file does not exist, an [MASK] is raised.",  # exception / error
)


def print_fills(text: str, fills) -> None:
    """Print ``text`` and, per [MASK], its ``(token, probability)`` options."""
    print(text)
    for n, options in enumerate(fills, 1):
        shown = ", ".join(f"{token} {prob:.1%}" for token, prob in options)
        print(f"  [MASK] {n}: {shown}" if len(fills) > 1 else f"  [MASK]: {shown}")


def check_not_another_folder(out_dir) -> None:
    """Refuse (ValueError) an ``out_dir`` that holds no train run but a fine-tuning run or a model
    folder (save_pretrained, export-hf, a Hugging Face download): the demo's training writes its own
    tokenizer.json over the model's and its checkpoints/ beside it, and run_dir.check_demo_may_replace
    only knows train runs."""
    out_dir = Path(out_dir)  # (an empty one, the current folder, is refused by TrainConfig)
    if (out_dir / "finetune_config.json").is_file():
        raise ValueError(f"{out_dir} holds a `fastmlm finetune` run, which the demo does not replace; give the "
                         f"demo another --out-dir, or move that run away")
    if (out_dir / "train_config.json").is_file():  # a train or demo run: check_demo_may_replace decides
        return
    # not a lone tokenizer.json: a demo killed while it made its tokenizer leaves one, and may be run again
    found = [name for name in ("config.json", "model.safetensors") if (out_dir / name).exists()]
    if found:
        raise ValueError(f"--out-dir {out_dir} holds {', '.join(found)}: a model folder, not a demo run; the demo "
                         f"would write its own tokenizer.json over the model's; give the demo another --out-dir")


def run_demo(out_dir: str, device: str = "auto", max_steps: Optional[int] = None, progress: bool = True) -> dict:
    """Train the demo into ``out_dir`` (replacing an earlier demo run only), print the report; return train's summary."""
    from . import data
    from .config import train_preset
    from .corpus_reader import training_sources
    from .distributed import resolve_device
    from .plot import read_log
    from .predict import fill_mask, load_checkpoint
    from .run_dir import check_demo_may_replace
    from .train import UNIGRAM_DOCUMENTS, evaluate, train

    name = "demo-gpu" if resolve_device(device).type == "cuda" else "demo"
    overrides = {"out_dir": out_dir, "progress": progress, "device": device, "made_by": "demo"}
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    cfg = train_preset(name, **overrides)
    check_not_another_folder(cfg.out_dir)  # nor a fine-tuning run or a model folder
    check_demo_may_replace(cfg.out_dir)  # never a run that `fastmlm train` made
    start = time.perf_counter()
    summary = train(cfg, overwrite=True)

    model, tokenizer = load_checkpoint(summary["checkpoint"], summary["device"])
    collator = data.MaskingCollator(tokenizer, cfg.seq_len, cfg.batch_size, cfg.mask_rate, cfg.whole_word)
    train_files, valid_files = training_sources(cfg.data, cfg.valid_data, cfg.valid_holdout)
    valid = data.eval_batches(valid_files, tokenizer, collator, max_batches=cfg.eval_batches)  # the masks train used
    counts = data.unigram_counts(train_files, tokenizer, max_documents=UNIGRAM_DOCUMENTS)  # as unigram_bias took
    baseline = data.unigram_baseline(counts, valid)
    losses = read_log(cfg.out_dir)["train"]["loss"]
    ours = summary["valid"]

    print()
    print(f"fastmlm demo ({name} preset): {summary['step']} steps on {summary['device']}, "
          f"{time.perf_counter() - start:.0f} s in all, {summary['tokens_per_s']:,.0f} training tokens/s")
    if losses:
        thirds = np.array_split(np.array(losses), 3)
        print("train loss (mean of each third of the run): " + " -> ".join(f"{t.mean():.3f}" for t in thirds if len(t)))
    how = f"{cfg.mask_rate:.0%} of the tokens masked" + (", whole words" if cfg.whole_word else "")
    print(f"validation split ({ours['n_masked']} masked tokens, {how})   accuracy   perplexity")
    print(f"  fastmlm model                                    {ours['accuracy']:7.1%}   {ours['perplexity']:10.1f}")
    print(f"  unigram-frequency baseline                       {baseline['accuracy']:7.1%}   "
          f"{baseline['perplexity']:10.1f}")
    if cfg.mask_rate != 0.15 or cfg.whole_word:  # beside the figures of earlier demos, measured at 15%
        at15 = evaluate(model, data.eval_batches(valid_files, tokenizer, data.MaskingCollator(
            tokenizer, cfg.seq_len, cfg.batch_size, 0.15), max_batches=cfg.eval_batches),
            model.embeddings.word.weight.device)
        print(f"  fastmlm model, 15% of the tokens masked ({at15['n_masked']})     {at15['accuracy']:7.1%}   "
              f"{at15['perplexity']:10.1f}")
    print("  (accuracy: the share of masked tokens whose most likely token is right, 80% of them shown as [MASK], "
          "10% random, 10% unchanged; perplexity: exp of their mean cross-entropy)")
    print()
    for text in DEMO_SENTENCES:
        print_fills(text, fill_mask(model, tokenizer, text, top_k=5))
    curves = Path(cfg.out_dir) / "curves.png"
    print(f"\ncheckpoint: {summary['checkpoint']}  (try: fastmlm fill-mask {cfg.out_dir} \"...[MASK]...\")")
    if curves.exists():
        print(f"curves: {curves}")
    return summary
