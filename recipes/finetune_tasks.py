"""The three fine-tuning tasks of ``recipes/finetune.py``, on data no one here wrote: MNIST and
the Python standard library's own sources and docstrings.

Each task pretrains its model once with backprop (cached under ``cache_dir``), then offers
seeded training batches, a loss, an evaluation and the parameters to train:

- ``mnist-transfer``: a CNN (80 k parameters) pretrained on some digit classes, fine-tuned on
  others (their labels mapped to the same 5 outputs); metric: test accuracy (%).
- ``lm-domain``: a GPT-2 (1 M parameters, byte-level BPE of 1024 tokens trained here)
  pretrained on the top-level modules' source code, fine-tuned on the docstrings of the
  standard library's packages (prose, not code); metric: eval loss on held-out files' docstrings.
- ``prompt-classification``: MeZO's setting: the pretrained LM of ``lm-domain`` tells which
  package a docstring comes from by its logits for label words after a template; metric:
  accuracy (%) on held-out files.

The pretrained LM and its tokenizer are saved with ``save_pretrained`` (``<cache_dir>/lm``),
so stock HF scripts load them with ``--model_name_or_path <cache_dir>/lm``.

>>> TASKS["lm-domain"].metric, TASKS["mnist-transfer"].higher_is_better
('eval loss', True)
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins.engine.lm_loss import blocked_causal_lm_loss

log = logging.getLogger("finetune")

STDLIB = Path(os.__file__).parent
PACKAGES = ("email", "asyncio", "unittest", "xml", "json", "http", "logging", "importlib",
            "concurrent", "multiprocessing", "urllib", "ctypes", "html", "wsgiref", "xmlrpc", "tomllib")
LABELS = {"email": " email", "asyncio": " async", "unittest": " test", "xml": " xml"}  # package: label word
TEMPLATE = "\nThis is from the package:"


# ---- text: the standard library, split by module ------------------------------------------------


def module_files(package: str | None) -> list[Path]:
    """The ``.py`` files of a stdlib package, or the top-level modules for None; sorted."""
    if package is None:
        return sorted(STDLIB.glob("*.py"))
    return sorted((STDLIB / package).rglob("*.py"))


def docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of a source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def held_out(path: Path) -> bool:
    """One file in five, by a hash of its name: the eval split (whole files, so no text is shared)."""
    return hashlib.sha1(path.name.encode()).digest()[0] % 5 == 0


def lm_tokenizer(cache_dir: Path, toy: bool = False):
    """A byte-level BPE of 1024 tokens (512 for ``toy``, on a few files) trained on the
    pretraining text (cached), as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    folder = cache_dir / "lm"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in module_files(None)[:8 if toy else None]]
    if toy:  # so few files, the label words' first tokens need a nudge to differ
        texts.append("".join(LABELS.values()) * 50)
    bpe.train_from_iterator(texts,
                            vocab_size=512 if toy else 1024, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


# ---- the tasks -----------------------------------------------------------------------------------------


@dataclass
class Task:
    """A task's data and model; ``prepare(cache_dir)`` pretrains (once) and loads the data;
    ``evaluate(model)`` runs in eval mode (no dropout) and leaves the model as it found it."""

    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    batch_size: int = 32
    data: dict = field(default_factory=dict)
    toy: bool = False  # tiny models and data, pretrained in seconds: for the tests

    def evaluate(self, model) -> float:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.metric_of(model)
        finally:
            model.train(training)

    def batches(self, seed: int) -> Iterator:
        """Training batches drawn with ``seed``: the same for every method of a seed."""
        generator = torch.Generator().manual_seed(10_000 + seed)
        inputs, targets = self.data["train"]
        while True:
            index = torch.randint(0, len(inputs), (self.batch_size,), generator=generator)
            yield inputs[index], (targets[index] if targets is not None else None)


class MnistTransfer(Task):
    """A CNN pretrained on ``pretrain_classes``, fine-tuned on ``finetune_classes`` (label i of the
    fine-tuning task is the i-th class listed)."""

    def __init__(self, pretrain_classes=(0, 1, 2, 3, 4), finetune_classes=(5, 6, 7, 8, 9), eval_size=2000):
        super().__init__("mnist-transfer", "test accuracy (%)", True, 64)
        self.pretrain_classes, self.finetune_classes, self.eval_size = pretrain_classes, finetune_classes, eval_size

    def build(self) -> nn.Module:
        outputs = max(len(self.pretrain_classes), len(self.finetune_classes))
        return nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, outputs))

    def _split(self, dataset, classes, limit=None):
        images, labels = dataset.tensors
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep][:limit], labels[keep][:limit]
        mapping = torch.full((10,), -1, dtype=torch.long)
        mapping[torch.tensor(classes)] = torch.arange(len(classes))
        return images, mapping[labels]

    def prepare(self, cache_dir: Path, data_dir=None) -> nn.Module:
        from mnist_data import mnist

        train, test = mnist(data_dir, train=True, limit=3000 if self.toy else None), mnist(data_dir, train=False)
        self.data["train"] = self._split(train, self.finetune_classes)
        self.data["eval"] = self._split(test, self.finetune_classes, 200 if self.toy else self.eval_size)
        path = cache_dir / f"mnist-cnn-{'-'.join(map(str, self.pretrain_classes))}.pt"
        model = self.build()
        if path.exists():
            model.load_state_dict(torch.load(path))
            return model
        log.info("pretraining the CNN on digits %s (once; cached in %s)", self.pretrain_classes, path)
        images, labels = self._split(train, self.pretrain_classes)
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for start in range(0, len(images) - 63, 64):  # one epoch
            optimizer.zero_grad()
            F.cross_entropy(model(images[start:start + 64]), labels[start:start + 64]).backward()
            optimizer.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)

    def metric_of(self, model) -> float:
        images, labels = self.data["eval"]
        images = images.to(next(model.parameters()).dtype)  # bfloat16 runs
        predictions = torch.cat([model(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)])
        return 100.0 * (predictions == labels).float().mean().item()

    def head(self, model) -> list[str]:
        return [n for n, _ in model.named_parameters() if n.startswith(f"{len(model) - 1}.")]


class LmDomain(Task):
    """GPT-2 pretrained on code (top-level stdlib modules), fine-tuned on package docstrings."""

    length = 64

    def __init__(self, name="lm-domain", metric="eval loss", higher_is_better=False, batch_size=16):
        super().__init__(name, metric, higher_is_better, batch_size)

    def pretrained(self, cache_dir: Path):
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = lm_tokenizer(cache_dir, self.toy)
        folder = cache_dir / "lm"
        if (folder / "config.json").exists():
            return GPT2LMHeadModel.from_pretrained(folder), tokenizer
        log.info("pretraining the LM on the standard library's top-level modules (once; cached in %s)", folder)
        files = module_files(None)[:8] if self.toy else module_files(None)
        code = token_stream(tokenizer, [p.read_text(encoding="utf-8", errors="replace") for p in files])
        torch.manual_seed(0)
        width, layers = (32, 1) if self.toy else (128, 4)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers, n_head=4,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
        steps = 20 if self.toy else 600
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        generator = torch.Generator().manual_seed(0)
        for step in range(steps):
            starts = torch.randint(0, len(code) - self.length, (32,), generator=generator)
            ids = torch.stack([code[s:s + self.length] for s in starts])
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0:
                log.info("pretraining step %d: loss %.3f", step, loss.item())
        model.save_pretrained(folder)
        return model, tokenizer

    def prepare(self, cache_dir: Path, data_dir=None) -> nn.Module:
        model, tokenizer = self.pretrained(cache_dir)
        files = [p for package in PACKAGES[:3 if self.toy else None] for p in module_files(package)]
        for split, chosen in (("train", [p for p in files if not held_out(p)]), ("eval", [p for p in files if held_out(p)])):
            stream = token_stream(tokenizer, [d for p in chosen for d in docstrings(p)])
            self.data[split] = (stream[:len(stream) // self.length * self.length].view(-1, self.length), None)
        eval_ids = self.data["eval"][0]
        self.data["eval"] = (eval_ids[torch.randperm(len(eval_ids), generator=torch.Generator().manual_seed(0))[:64]], None)
        return model

    def loss(self, model, batch) -> torch.Tensor:
        # The head's logits and their cross-entropy a block at a time: the whole (B, T, V) logits
        # (and, in forward mode, their tangent) never exist at once, for every method alike.
        return blocked_causal_lm_loss(model, batch[0], block_vocab=256)

    def metric_of(self, model) -> float:
        return self.loss(model, self.data["eval"]).item()

    def head(self, model) -> list[str]:
        last = model.config.n_layer - 1
        return [n for n, _ in model.named_parameters() if f".h.{last}." in n]  # the last block


class PromptClassification(LmDomain):
    """Which package a docstring comes from, as the LM's choice among label words after a
    template: cross-entropy over the label words' first-token logits (MeZO's prompt setting)."""

    text_tokens = 40

    def __init__(self):
        super().__init__("prompt-classification", "eval accuracy (%)", True, 16)

    def prepare(self, cache_dir: Path, data_dir=None) -> nn.Module:
        model, tokenizer = self.pretrained(cache_dir)
        words = [tokenizer(word)["input_ids"][0] for word in LABELS.values()]
        if len(set(words)) != len(words):
            raise RuntimeError(f"label words {list(LABELS.values())} share a first token: choose others")
        self.label_tokens = torch.tensor(words)
        template = tokenizer(TEMPLATE)["input_ids"]
        for split, keep in (("train", False), ("eval", True)):
            rows, labels = [], []
            for label, package in enumerate(LABELS):
                for path in module_files(package)[:15 if self.toy else None]:
                    if held_out(path) != keep:
                        continue
                    for text in docstrings(path):
                        ids = tokenizer(text)["input_ids"]
                        if len(ids) >= 12:  # left-padded with newlines to a fixed length
                            ids = ids[:self.text_tokens]
                            pad = tokenizer("\n")["input_ids"] * (self.text_tokens - len(ids))
                            rows.append(pad + ids + template)
                            labels.append(label)
            order = random.Random(0).sample(range(len(rows)), len(rows))
            if keep:  # a class-balanced eval set
                per_class = min(labels.count(c) for c in range(len(LABELS)))
                order = [i for c in range(len(LABELS)) for i in [j for j in order if labels[j] == c][:per_class]]
            self.data[split] = (torch.tensor([rows[i] for i in order]), torch.tensor([labels[i] for i in order]))
        return model

    def export_csv(self, folder: Path) -> None:
        """The same docstrings and labels as ``train.csv`` and ``validation.csv`` (columns
        ``sentence``, ``label``: the package's index in ``LABELS``, 0 to 3), for HF's stock
        text-classification script (``--train_file``, ``--validation_file``); the validation
        split is the held-out files, class-balanced as here."""
        import csv

        folder.mkdir(parents=True, exist_ok=True)
        for split, keep in (("train", False), ("validation", True)):
            rows = [(text, label) for label, package in enumerate(LABELS) for path in module_files(package)
                    if held_out(path) == keep for text in docstrings(path)]
            if keep:
                per_class = min(sum(label == c for _, label in rows) for c in range(len(LABELS)))
                rows = [row for c in range(len(LABELS)) for row in [r for r in rows if r[1] == c][:per_class]]
            random.Random(0).shuffle(rows)
            with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                writer.writerow(["sentence", "label"])
                writer.writerows(rows)

    def logits(self, model, ids) -> torch.Tensor:
        last = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]  # (B, V): the last token's
        return last[:, self.label_tokens].float()  # (B, labels)

    def loss(self, model, batch) -> torch.Tensor:
        ids, labels = batch
        return F.cross_entropy(self.logits(model, ids), labels)

    def metric_of(self, model) -> float:
        ids, labels = self.data["eval"]
        predictions = torch.cat([self.logits(model, ids[i:i + 128]).argmax(-1) for i in range(0, len(ids), 128)])
        return 100.0 * (predictions == labels).float().mean().item()


TASKS = {"mnist-transfer": MnistTransfer(), "lm-domain": LmDomain(), "prompt-classification": PromptClassification()}
