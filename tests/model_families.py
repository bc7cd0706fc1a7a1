"""One tiny model of each family a user may bring, for the engine's tests.

Each builder returns ``(model, closure, reference)``: ``closure`` is what a user passes to
``ForwardGradient.step``; ``reference`` computes the same loss for backprop (the uncompiled
model where ``closure`` calls a compiled one). Dropout is off so the two see one function.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _lm_loss(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    model = BertForSequenceClassification(config)
    ids, labels = torch.randint(0, 30, (3, 7)), torch.randint(0, 3, (3,))
    mask = torch.ones_like(ids).index_fill_(1, torch.tensor([5, 6]), 0)  # padded keys
    closure = lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return model, closure, closure


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                              max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
                              seq_classif_dropout=0.0, num_labels=3)
    model = DistilBertForSequenceClassification(config)
    ids, labels = torch.randint(0, 30, (3, 7)), torch.randint(0, 3, (3,))
    closure = lambda: model(input_ids=ids, labels=labels).loss
    return model, closure, closure


def tiny_gpt2(attn_implementation="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn_implementation)
    model = GPT2LMHeadModel(config)
    closure = _lm_loss(model, torch.randint(0, 30, (2, 8)))
    return model, closure, closure


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    closure = _lm_loss(model, torch.randint(0, 30, (2, 8)))
    return model, closure, closure


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(config)
    ids, labels = torch.randint(1, 30, (2, 7)), torch.randint(1, 30, (2, 5))
    closure = lambda: model(input_ids=ids, labels=labels).loss
    return model, closure, closure


def tiny_hf_vit(attn_implementation):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation=attn_implementation)
    model = ViTForImageClassification(config)
    pixels, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))
    closure = lambda: model(pixel_values=pixels, labels=labels).loss
    return model, closure, closure


def classifier(model, x, classes, batch_dim=0):
    y = torch.randint(0, classes, (x.shape[batch_dim],))
    closure = lambda: F.cross_entropy(model(x), y)
    return model, closure, closure


def resnet18_batchnorm():
    from torchvision.models import resnet18

    return classifier(resnet18(num_classes=4), torch.randn(2, 3, 32, 32), 4)  # train mode: batch stats


class Recurrent(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.rnn, self.head = layer(5, 6, num_layers=2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class SelfAttention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1 if self.attn.batch_first else 0))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x, is_causal=False).mean(1))


def torchvision_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                              mlp_dim=16, num_classes=3)
    return classifier(model, torch.randn(2, 3, 16, 16), 3)


def lora(build):
    from peft import LoraConfig, get_peft_model

    def build_lora():
        model, _, _ = build()
        modules = ["c_attn"] if "GPT2" in type(model).__name__ else ["q_proj", "v_proj"]
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=modules, lora_dropout=0.0))
        with torch.no_grad():  # B starts at 0; a non-zero B gives A a derivative too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        closure = _lm_loss(model, torch.randint(0, 30, (2, 8)))
        return model, closure, closure

    return build_lora


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def compiled(build, how):
    """``build()``'s model (an nn.Module), called compiled in the closure: the module (an
    OptimizedModule) or a compiled function calling it."""

    def build_compiled():
        model = build()
        x = torch.randn(4, 6) if isinstance(model, Mlp) else torch.randn(2, 1, 8, 8)
        y = torch.randint(0, 3, (4 if isinstance(model, Mlp) else 2,))
        call = torch.compile(model) if how == "module" else torch.compile(lambda inputs: model(inputs))
        return model, (lambda: F.cross_entropy(call(x), y)), (lambda: F.cross_entropy(model(x), y))

    return build_compiled


def compiled_gpt2(how):
    def build_compiled():
        model, _, reference = tiny_gpt2()
        ids = torch.randint(0, 30, (2, 8))
        if how == "module":
            call = torch.compile(model)
            return model, (lambda: call(input_ids=ids, labels=ids).loss), _lm_loss(model, ids)
        call = torch.compile(lambda: model(input_ids=ids, labels=ids).loss)
        return model, call, _lm_loss(model, ids)

    return build_compiled


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


FAMILIES = {
    "bert": tiny_bert,
    "distilbert": tiny_distilbert,
    "gpt2": tiny_gpt2,
    "gpt2_eager": lambda: tiny_gpt2("eager"),
    "llama": tiny_llama,
    "t5": tiny_t5,
    "hf_vit_sdpa": lambda: tiny_hf_vit("sdpa"),
    "hf_vit_eager": lambda: tiny_hf_vit("eager"),
    "resnet18_batchnorm": resnet18_batchnorm,
    "gru": lambda: classifier(Recurrent(nn.GRU), torch.randn(3, 4, 5), 3),
    "lstm": lambda: classifier(Recurrent(nn.LSTM), torch.randn(3, 4, 5), 3),
    "multihead_attention": lambda: classifier(SelfAttention(True), torch.randn(3, 5, 8), 3),
    "multihead_attention_seq_first": lambda: classifier(SelfAttention(False), torch.randn(5, 3, 8), 3, batch_dim=1),
    "transformer_encoder": lambda: classifier(Encoder(), torch.randn(3, 5, 8), 3),
    "torchvision_vit": torchvision_vit,
    "lora_gpt2": lora(tiny_gpt2),
    "lora_llama": lora(tiny_llama),
    "compiled_mlp": compiled(Mlp, "module"),
    "compiled_mlp_function": compiled(Mlp, "function"),
    "compiled_cnn": compiled(cnn, "module"),
    "compiled_gpt2": compiled_gpt2("module"),
    "compiled_gpt2_function": compiled_gpt2("function"),
}


def autograd_derivatives(reference, params, tangents):
    grads = torch.autograd.grad(reference(), params, allow_unused=True)
    return torch.stack([sum((g * t[k]).sum() for g, t in zip(grads, tangents) if g is not None)
                        for k in range(tangents[0].shape[0])])
