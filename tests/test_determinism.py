"""Same seed and data, bit-identical results: the trained tokenizer (same tokens, same ids) in two
fresh processes, and two whole training runs (log.csv and weights).

The tokenizer trainings run in processes of their own, with different PYTHONHASHSEEDs and
tokenizers parallelism on in one and off in the other: nothing may depend on a process's hash
seeds. (Rust seeds every hash map afresh, so a hash-order dependence shows within one process
too, which keeps the training-run check in-process and fast.)
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmlm import train
from fastmlm.checkpoint import WEIGHTS_NAME, read_safetensors
from fastmlm.config import train_preset
from mlm_corpus import one_thread, write_small_corpus

ROOT = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

TRAIN_TOKENIZER = r"""
import json, sys
from fastmlm.corpus_reader import read_documents
from fastmlm.tokenizer import train_tokenizer

corpus, out = sys.argv[1:]
tokenizer = train_tokenizer(read_documents([corpus]), vocab_size=400)
with open(out, "w") as f:
    json.dump(tokenizer.get_vocab(with_added_tokens=False), f, sort_keys=True)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_small_corpus(root, n_train=200, n_valid=20)
    return root


def test_tokenizer_training_is_identical_across_processes(corpus, tmp_path):
    procs, outs = [], []
    for hash_seed, parallel in (("1", "true"), ("2", "false")):  # both at once: 2 cores
        out = tmp_path / f"vocab{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "TOKENIZERS_PARALLELISM": parallel,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_TOKENIZER, str(corpus / "train.txt"), str(out)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
    first, second = (json.loads(out.read_text()) for out in outs)
    assert len(first) == 400
    differ = sorted(t for t in first.keys() | second.keys() if first.get(t) != second.get(t))
    assert not differ, f"{len(differ)} tokens have another id (or are missing) in the second run: {differ[:10]}"


def _log_rows(run: Path) -> list[dict]:
    """log.csv without its wall-clock columns."""
    with open(run / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")} for row in csv.DictReader(f)]


def test_training_runs_are_bit_identical(corpus, tmp_path):
    runs = [tmp_path / "first", tmp_path / "second"]
    summaries = [train.train(train_preset(  # tokenizer=None: each run trains its own, as a fresh run does
        "tiny", data=[str(corpus / "train.txt")], valid_data=[str(corpus / "valid.txt")], tokenizer=None,
        out_dir=str(run), max_steps=4, eval_every=4, save_every=4, log_every=1, progress=False, device="cpu"))
        for run in runs]
    assert (runs[0] / "tokenizer.json").read_bytes() == (runs[1] / "tokenizer.json").read_bytes()
    rows = _log_rows(runs[0])
    assert len([r for r in rows if r["split"] == "train"]) == 4 and rows == _log_rows(runs[1])
    first, second = (read_safetensors(Path(s["checkpoint"]) / WEIGHTS_NAME) for s in summaries)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
