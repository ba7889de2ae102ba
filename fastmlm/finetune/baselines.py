"""The two baselines every fine-tuning result is printed beside, on the same split.

- majority: every example gets the most frequent training label (for tags: every word the most
  frequent tag, ``O``, which finds no entity, so its entity F1 is 0);
- bag of words: a multinomial logistic regression on sparse features, trained on the training
  split with fixed settings (no tuning on the validation split). For sequences the features are
  the lowercased words and word pairs of the text; for tags, per word: the word, its neighbours,
  its last three characters and its shape (``Aa()`` for ``Path()``) -- the usual linear tagger.

The regression runs on a sparse (units, features) matrix of log counts, full-batch L-BFGS from
zeros (a convex problem, so deterministic); features seen fewer than MIN_COUNT times in training
are dropped.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import torch
import torch.nn.functional as F

from .metrics import task_scores
from .tasks import Task

_WORD = re.compile(r"\w+")
STEPS, L2, MIN_COUNT = 100, 1e-5, 2  # fixed; chosen once, not on any validation figure


def majority(task: Task) -> dict:
    """The majority-class baseline's scores on ``task.valid``."""
    if task.kind == "sequence":
        top = Counter(label for _, label in task.train).most_common(1)[0][0]
        return task_scores("sequence", [label for _, label in task.valid], [top] * len(task.valid))
    top = Counter(tag for _, tags in task.train for tag in tags).most_common(1)[0][0]
    return task_scores("tokens", [tags for _, tags in task.valid], [[top] * len(tags) for _, tags in task.valid])


def _shape(word: str) -> str:
    return re.sub(r"(.)\1+", r"\1", re.sub(r"[A-Z]", "A", re.sub(r"[a-z]", "a", re.sub(r"\d", "0", word))))


def _units(task: Task, examples) -> tuple[list[list[str]], list[str]]:
    """(features, target) of every prediction unit: an example for sequences, a word for tags."""
    feats, targets = [], []
    for x, y in examples:
        if task.kind == "sequence":
            words = _WORD.findall(x.lower())
            feats.append([f"w={w}" for w in words] + [f"b={a}_{b}" for a, b in zip(words, words[1:])])
            targets.append(y)
            continue
        padded = ["<s>"] + [t.lower() for t in x] + ["</s>"]
        for i, (token, tag) in enumerate(zip(x, y)):
            feats.append([f"w={padded[i + 1]}", f"p={padded[i]}", f"n={padded[i + 2]}", f"s={token[-3:].lower()}",
                          f"shape={_shape(token)}", "bias"])
            targets.append(tag)
    return feats, targets


def _matrix(feats: list[list[str]], vocab: dict[str, int]) -> torch.Tensor:
    """(units, features) sparse CSR matrix: log(1 + count) of each known feature, each row L2-normalised."""
    rows, cols, values = [], [], []
    for row, bag in enumerate(feats):
        counts = {i: math.log1p(c) for i, c in Counter(vocab[f] for f in bag if f in vocab).items()}
        norm = math.sqrt(sum(w * w for w in counts.values())) or 1.0
        rows.extend([row] * len(counts))
        cols.extend(counts)
        values.extend(w / norm for w in counts.values())
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    coo = torch.sparse_coo_tensor(index, torch.tensor(values, dtype=torch.float32), (len(feats), len(vocab)),
                                  check_invariants=False)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (features, classes) and bias of an L2-regularised softmax regression, by L-BFGS.

    The gradient is written out, X^T (softmax(XW + b) - onehot(y)) / N + 2 L2 W, because autograd
    through sparse products is several times slower on the CPU.
    """
    weight = torch.zeros(x.shape[1], n_classes, requires_grad=True)  # a convex loss: zeros are a fine start
    bias = torch.zeros(n_classes, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        x_t = x.to_sparse_coo().t().coalesce().to_sparse_csr()
    rows = torch.arange(len(y))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=STEPS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            logits = x @ weight + bias  # (N, C)
            loss = F.cross_entropy(logits, y) + L2 * weight.pow(2).sum()
            residual = logits.softmax(-1)
            residual[rows, y] -= 1.0
            residual /= len(y)
            weight.grad = x_t @ residual + 2 * L2 * weight
            bias.grad = residual.sum(0)
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def bag_of_words(task: Task) -> dict:
    """The bag-of-words logistic regression's scores on ``task.valid`` (trained on ``task.train``)."""
    feats, targets = _units(task, task.train)
    seen = Counter(f for bag in feats for f in bag)
    vocab = {f: i for i, f in enumerate(sorted(f for f, n in seen.items() if n >= MIN_COUNT))}
    classes = sorted(set(targets))
    index = {c: i for i, c in enumerate(classes)}
    weight, bias = _fit(_matrix(feats, vocab), torch.tensor([index[t] for t in targets]), len(classes))
    valid_feats, _ = _units(task, task.valid)
    labels = [classes[i] for i in (_matrix(valid_feats, vocab) @ weight + bias).argmax(-1).tolist()]
    if task.kind == "sequence":
        return task_scores("sequence", [label for _, label in task.valid], labels)
    out, at = [], 0
    for tokens, _ in task.valid:  # the word predictions, back into one tag list per example
        out.append(labels[at:at + len(tokens)])
        at += len(tokens)
    return task_scores("tokens", [tags for _, tags in task.valid], out)
