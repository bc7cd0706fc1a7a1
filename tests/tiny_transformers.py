"""Tiny BERT and GPT-2 models built from configs (no download), their data and the
``FwdGradTrainingArguments`` the trainer tests share."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config

from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments

VOCAB, LENGTH = 24, 8



def tiny_bert(dropout=0.1):
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


def tiny_gpt2(dropout=0.1):
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=LENGTH,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def classification_data(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": int(x[0] % 2)}
            for x in ids]


def language_data(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": x, "labels": x} for x in torch.randint(VOCAB, (n, LENGTH), generator=g)]


MODELS = {
    "bert": (tiny_bert, classification_data, "bert.embeddings.word_embeddings.weight"),
    "gpt2": (tiny_gpt2, language_data, "transformer.wpe.weight"),  # wte is tied to lm_head
}


def arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), optim="fwdgrad", learning_rate=1e-2, max_steps=1,
                   per_device_train_batch_size=4, use_cpu=True, report_to="none", save_strategy="no",
                   disable_tqdm=True, logging_steps=1, seed=0)
    return FwdGradTrainingArguments(**{**options, **overrides})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class OwnComputeLoss(FwdGradTrainer):
    """A subclass's compute_loss: the trainer runs it as written (the model's own loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
