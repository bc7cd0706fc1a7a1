# Forward gradient against backprop through the HuggingFace Trainer: a tiny BERT, built from a
# config (no download), classifies MNIST digits read as token sequences: each image is average-
# pooled to 7x7 and every pixel becomes one token naming its position and its grey level (one of
# 4), so a sequence is [CLS] + 49 tokens over a vocabulary of 196 + 2. Data: real MNIST from
# --data_dir or FWDGRAD_DATA_DIR (torchvision layout, read by recipes/mnist_data.py).
#
#   export FWDGRAD_DATA_DIR=../shared/data
#   python recipes/hf_trainer.py --optim adamw_torch
#   python recipes/hf_trainer.py --optim fwdgrad --fwdgrad_inner_optim adamw_torch
#   python recipes/hf_trainer.py --optim fwdgrad --fwdgrad_inner_optim adamw_torch --fwdgrad_num_directions 4
#   accelerate launch --multi_gpu --num_processes 2 recipes/hf_trainer.py --optim fwdgrad \
#       --fwdgrad_inner_optim adamw_torch --per_device_train_batch_size 32 --use_cpu
#
# Every run appends its result to --results_file and prints all runs recorded there, so the
# second command prints the comparison. Defaults: 2000 steps of batch 64, lr 1e-2 with linear
# decay, the same initial weights for every run, evaluation on 2000 test digits. The commands
# use AdamW for both methods; forward gradient's default inner optimizer, SGD as in the paper,
# needs another lr here. Without a GPU, Trainer joins processes into one group only with
# --use_cpu (otherwise each trains alone). Any TrainingArguments or --fwdgrad_* option works
# (`--help`). On a shared CPU, OMP_NUM_THREADS=1 avoids thread contention.
"""Forward gradient vs backprop through ``FwdGradTrainer`` on MNIST digits as token sequences."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser

import mnist_data as data  # recipes/mnist_data.py, beside this script
from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments

POOL, LEVELS = 4, 4  # 28x28 -> 7x7 pixels, each quantised to LEVELS grey levels
PIXELS = (28 // POOL) ** 2
CLS, PAD = PIXELS * LEVELS, PIXELS * LEVELS + 1  # token p * LEVELS + level is pixel p at that level


@dataclass
class RecipeArguments:
    data_dir: Optional[str] = field(default=None, metadata={"help": "MNIST folder (default: $FWDGRAD_DATA_DIR)."})
    train_samples: int = field(default=20000, metadata={"help": "Training digits used."})
    eval_samples: int = field(default=2000, metadata={"help": "Test digits evaluated."})
    hidden_size: int = field(default=32, metadata={"help": "BERT width."})
    num_layers: int = field(default=1, metadata={"help": "BERT layers."})
    results_file: str = field(default="runs/hf_trainer_results.jsonl", metadata={"help": "Where runs are compared."})


class DigitTokens(Dataset):
    """MNIST images as token sequences: [CLS], then one (position, grey level) token per pooled pixel."""

    def __init__(self, root, *, train: bool, limit: int):
        images, self.labels = data.mnist(root, train=train, limit=limit).tensors
        pixels = images * data.MNIST_STD + data.MNIST_MEAN  # back to [0, 1]
        pooled = F.avg_pool2d(pixels, POOL).flatten(1)  # (N, 49)
        levels = (pooled.clamp(0, 1) * (LEVELS - 1)).round().long()
        tokens = torch.arange(PIXELS) * LEVELS + levels
        self.input_ids = torch.cat([torch.full((len(tokens), 1), CLS), tokens], dim=1)  # (N, 50)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tiny_bert(recipe: RecipeArguments, sequence_length: int) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=PAD + 1, pad_token_id=PAD, hidden_size=recipe.hidden_size,
                        num_hidden_layers=recipe.num_layers, num_attention_heads=2,
                        intermediate_size=2 * recipe.hidden_size, max_position_embeddings=sequence_length,
                        num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def record(recipe: RecipeArguments, row: dict) -> list[dict]:
    """Append ``row`` to the results file; return the latest row per run name."""
    path = Path(recipe.results_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
    latest = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        latest[entry["run"]] = entry
    return list(latest.values())


def print_comparison(rows: list[dict]) -> None:
    """One line per run, then each run against the first backprop run (or the first run)."""
    width = max(len(row["run"]) for row in rows) + 2
    print(f"\n{'run':<{width}} {'steps':>6} {'s/step':>8} {'eval loss':>10} {'accuracy':>9}")
    for row in rows:
        print(f"{row['run']:<{width}} {row['steps']:>6} {row['seconds_per_step']:>8.4f} "
              f"{row['eval_loss']:>10.4f} {row['eval_accuracy']:>9.4f}")
    base = next((row for row in rows if row["run"].startswith("backprop")), rows[0])
    for row in rows:
        if row is not base:
            print(f"{row['run']} vs {base['run']}: time per step x{row['seconds_per_step'] / base['seconds_per_step']:.2f}, "
                  f"accuracy {row['eval_accuracy'] - base['eval_accuracy']:+.4f}")
    if len(rows) > 1:
        print("(times come from separate runs: compare them on a quiet machine)")


def run_name(args: FwdGradTrainingArguments) -> str:
    if args.forward_gradient:
        name = f"fwdgrad K={args.fwdgrad_num_directions} {args.fwdgrad_tangents} {args.fwdgrad_inner_optim}"
    else:
        name = f"backprop {getattr(args.optim, 'value', args.optim)}"
    processes = f" x{args.world_size} processes" if args.world_size > 1 else ""
    return f"{name} lr={args.learning_rate:g}{processes}"


def main():
    parser = HfArgumentParser((RecipeArguments, FwdGradTrainingArguments))
    parser.set_defaults(output_dir="runs/hf_trainer", max_steps=2000, per_device_train_batch_size=64,
                        per_device_eval_batch_size=500, learning_rate=1e-2,
                        # Trainer's max_grad_norm=1.0 would clip every forward-gradient estimate
                        # (its norm grows with √parameters): no clipping, for both methods.
                        max_grad_norm=0.0,
                        logging_steps=200, save_strategy="no", report_to="none", disable_tqdm=True,
                        # BERT's classification loss ignores num_items_in_batch, so Trainer's token
                        # averaging would double its loss (and eval loss) on 2 processes.
                        average_tokens_across_devices=False)
    recipe, args = parser.parse_args_into_dataclasses()
    try:  # this recipe never downloads: MNIST comes from a folder
        train_set = DigitTokens(recipe.data_dir, train=True, limit=recipe.train_samples)
        eval_set = DigitTokens(recipe.data_dir, train=False, limit=recipe.eval_samples)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error} (recipes/mnist.py can download it: run it once online "
                         "without --data-dir, then pass --data_dir data.)") from None
    torch.manual_seed(args.seed)  # the same initial weights for every optimizer
    model = tiny_bert(recipe, train_set.input_ids.shape[1])

    trainer = FwdGradTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             compute_metrics=accuracy)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        rows = record(recipe, {
            "run": run_name(args), "steps": result.global_step, "seconds_per_step": result.metrics["train_runtime"] / max(result.global_step, 1),
            "train_loss": result.training_loss, "eval_loss": metrics["eval_loss"],
            "eval_accuracy": metrics["eval_accuracy"], "processes": args.world_size,
            "recipe": asdict(recipe),
        })
        print_comparison(rows)


if __name__ == "__main__":
    main()
