"""On a CPU Accelerate drops its FSDP plugin: the Accelerate loop and FwdGradTrainer say so."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.utils.data import DataLoader, TensorDataset

from fwdgrad_plugins.distributed.accelerate_fsdp import warn_if_fsdp_ignored
from fwdgrad_plugins.integrations.accelerate_loop import TrainingOptions, train


@pytest.fixture
def fsdp_asked_for(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what --use_fsdp and an fsdp_config set


def test_no_warning_without_fsdp(monkeypatch, recwarn):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not warn_if_fsdp_ignored(Accelerator(cpu=True))
    assert not [w for w in recwarn if "FSDP" in str(w.message)]


def test_the_fsdp2_plugin_on_a_cpu_is_reported(fsdp_asked_for):
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    with pytest.warns(UserWarning, match="ignores its FSDP plugin .* trains replicated"):
        assert warn_if_fsdp_ignored(accelerator)


@pytest.mark.slow
def test_the_accelerate_loop_reports_it(fsdp_asked_for):
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = torch.nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="fully_shard yourself and launch with torchrun"):
        train(Accelerator(cpu=True), model, torch.optim.SGD(model.parameters(), lr=0.1),
              DataLoader(data, batch_size=8), DataLoader(data, batch_size=8), torch.nn.functional.cross_entropy,
              options=TrainingOptions(max_steps=1, progress_bar=False, measure_memory=False))


@pytest.mark.slow
def test_the_trainer_reports_it(fsdp_asked_for, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    args = FwdGradTrainingArguments(output_dir=str(tmp_path), optim="fwdgrad", use_cpu=True, report_to=[])
    with pytest.warns(UserWarning, match="ignores its FSDP plugin"):
        FwdGradTrainer(model=model, args=args)
