"""The blocked LM-head loss: the model's own loss, and the same directional derivatives."""

import pytest
import torch

from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.engine.lm_loss import blocked_causal_lm_loss
from fwdgrad_plugins.tangents.samplers import GaussianSampler


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=12,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=12))
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.mark.slow
@pytest.mark.parametrize("make", [gpt2, llama_lora])
@pytest.mark.parametrize("block_tokens, block_vocab", [(1, None), (5, 7), (None, 16), (None, None)])
def test_value_and_derivatives_are_the_models_own(make, block_tokens, block_vocab):
    model = make()
    ids = torch.randint(0, 40, (2, 12))
    labels = ids.clone()
    labels[0, 3:6] = -100
    full = lambda: model(input_ids=ids, labels=labels).loss
    blocked = lambda: blocked_causal_lm_loss(model, ids, labels, block_tokens=block_tokens, block_vocab=block_vocab)
    torch.testing.assert_close(blocked(), full(), rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    tangents = GaussianSampler().sample(params, 2, seed=0)
    expected = directional_derivatives(full, params, tangents).derivatives
    torch.testing.assert_close(directional_derivatives(blocked, params, tangents).derivatives, expected,
                               rtol=1e-4, atol=1e-5)


def test_a_head_that_is_not_linear_runs_whole_over_blocks_of_tokens():
    """peft LoRA on the head makes it a LoRA layer: applied as a module, a block of tokens at a time."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["lm_head", "c_attn"]))
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    ids = torch.randint(0, 40, (2, 12))
    full = lambda: model(input_ids=ids, labels=ids).loss
    blocked = lambda: blocked_causal_lm_loss(model, ids, block_tokens=5)
    torch.testing.assert_close(blocked(), full(), rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    tangents = GaussianSampler().sample(params, 1, seed=2)
    torch.testing.assert_close(directional_derivatives(blocked, params, tangents).derivatives,
                               directional_derivatives(full, params, tangents).derivatives, rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="block_tokens"):
        blocked_causal_lm_loss(gpt2(), torch.zeros(1, 4, dtype=torch.long), block_tokens=0)
    with pytest.raises(ValueError, match="block_vocab"):
        blocked_causal_lm_loss(gpt2(), torch.zeros(1, 4, dtype=torch.long), block_vocab=True)
    with pytest.raises(TypeError, match="not a HuggingFace causal language model"):
        blocked_causal_lm_loss(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))


def test_the_body_runs_without_a_kv_cache_unless_asked():
    """A KV cache keeps every layer's keys and values (and in forward mode their tangents)."""
    model = gpt2().train()
    assert model.config.use_cache
    seen = []
    model.transformer.register_forward_hook(lambda module, args, output: seen.append(output.past_key_values))
    ids = torch.randint(0, 40, (2, 12))
    blocked_causal_lm_loss(model, ids)
    blocked_causal_lm_loss(model, ids, use_cache=True)
    assert seen[0] is None and seen[1] is not None
