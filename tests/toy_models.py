"""Small models the tests share: each returns (model, loss closure)."""

import torch
from torch import nn
import torch.nn.functional as F


def mlp():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    return model, lambda: F.cross_entropy(model(x), y)


def cnn_batchnorm_dropout():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    return model, lambda: F.cross_entropy(model(x), y)


def dropout_mlp():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    return model, lambda: F.cross_entropy(model(x), y)


class TiedLinear(nn.Module):
    """One weight used by two layers: a parameter shared by two modules."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class MatmulWeight(nn.Module):
    """A 2-D weight used by ``@``, not by ``F.linear``: no rank-one rule of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5) / 2)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.weight))


def matmul_weight():
    model = MatmulWeight()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    return model, lambda: F.mse_loss(model(x), y)


def tied():
    model = TiedLinear()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    return model, lambda: F.mse_loss(model(x), y)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    ids, labels = torch.randint(0, 50, (3, 10)), torch.randint(0, 3, (3,))
    return model, lambda: model(input_ids=ids, labels=labels).loss


def tiny_gpt2():
    """Conv1D (torch.addmm) layers, and a token embedding tied to the output layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=12,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 40, (2, 12))
    return model, lambda: model(input_ids=ids, labels=ids).loss


MODELS = {"mlp": mlp, "cnn_batchnorm_dropout": cnn_batchnorm_dropout, "dropout_mlp": dropout_mlp,
          "tied": tied, "matmul_weight": matmul_weight, "tiny_bert": tiny_bert,
          "tiny_gpt2": tiny_gpt2}
