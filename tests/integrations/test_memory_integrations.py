"""ForwardSGD and SPSA through the HF trainer and the Accelerate loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

from fwdgrad_plugins import ForwardGradientEstimator, ForwardSGD, FwdGradTrainer
from fwdgrad_plugins.integrations.accelerate_loop import TrainingOptions, train

from tiny_loop import DECAY, dataset, fresh_model
from tiny_transformers import OwnComputeLoss, arguments, language_data, snapshot, tiny_gpt2

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def hf_run(output_dir, resume=None, **overrides):
    torch.manual_seed(0)
    model = tiny_gpt2()
    options = dict(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0.0,
                   weight_decay=0.01, lr_scheduler_type="linear")
    trainer = FwdGradTrainer(model=model, args=arguments(output_dir, **{**options, **overrides}),
                             train_dataset=language_data())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshot(model)


@pytest.mark.parametrize("estimator", ["weight", "spsa"])
def test_trainer_forward_sgd_is_trainer_sgd_without_grad(estimator, tmp_path):
    _, with_sgd = hf_run(tmp_path / "sgd", fwdgrad_estimator=estimator)
    trainer, with_forward_sgd = hf_run(tmp_path / "fsgd", fwdgrad_estimator=estimator,
                                       fwdgrad_inner_optim="forward_sgd")
    assert isinstance(trainer.optimizer.optimizer, ForwardSGD)
    assert trainer.forward_gradient.step == 4  # one tangent draw per micro-batch
    assert all(p.grad is None for p in trainer.model.parameters())
    for name, value in with_sgd.items():
        torch.testing.assert_close(with_forward_sgd[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_forward_sgd_resumes_bit_identical(tmp_path):
    _, straight = hf_run(tmp_path / "straight", max_steps=4, save_steps=2, save_strategy="steps",
                         fwdgrad_inner_optim="forward_sgd", fwdgrad_num_directions=2)
    _, resumed = hf_run(tmp_path / "resumed", max_steps=4, save_steps=2, save_strategy="steps",
                        fwdgrad_inner_optim="forward_sgd", fwdgrad_num_directions=2,
                        resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert all(torch.equal(value, resumed[name]) for name, value in straight.items())


def test_trainer_warns_that_clipping_does_not_apply_to_forward_sgd(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm 1.0 does not apply"):
        FwdGradTrainer(model=tiny_gpt2(), args=arguments(tmp_path, fwdgrad_inner_optim="forward_sgd"),
                       train_dataset=language_data())


def loop(optimizer, model, estimator=None, **options):
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=3))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=DECAY)
    return train(accelerator, model, optimizer, DataLoader(dataset(), batch_size=8, drop_last=True),
                 DataLoader(dataset(), batch_size=20), F.cross_entropy, method="fwdgrad", estimator=estimator,
                 scheduler=scheduler,
                 options=TrainingOptions(progress_bar=False, measure_memory=False, epochs=2, **options))


@pytest.mark.parametrize("estimator", ["weight", "spsa"])
def test_accelerate_loop_with_forward_sgd_is_the_loop_with_sgd(estimator, tmp_path):
    options = dict(num_directions=2, seed=5, estimator=estimator)
    model = fresh_model()
    loop(torch.optim.SGD(model.parameters(), lr=0.1), model, ForwardGradientEstimator(**options), max_steps=6)
    expected = copy.deepcopy(model.state_dict())
    model = fresh_model()
    result = loop(ForwardSGD(model.parameters(), lr=0.1, **options), model, max_steps=6,
                  checkpoint_dir=str(tmp_path), checkpoint_every=3)
    assert result.steps == 6 and not result.diverged
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7)
    resumed = fresh_model()
    loop(ForwardSGD(resumed.parameters(), lr=0.1, **options), resumed, max_steps=6,
         resume_from=str(tmp_path / "checkpoint-3"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_accelerate_loop_refuses_an_estimator_beside_forward_sgd():
    model = fresh_model()
    with pytest.raises(ValueError, match="ForwardSGD, which estimates and applies"):
        loop(ForwardSGD(model.parameters(), lr=0.1), model, ForwardGradientEstimator())


def test_trainer_takes_a_causal_lms_loss_a_block_of_the_vocabulary_at_a_time(tmp_path):
    """Trainer's own compute_loss on a causal LM never calls the head: the loss comes from
    blocked_causal_lm_loss, and the steps (two micro-batches each, so HF's num_items_in_batch
    divides the loss) are those of the model's own loss."""
    runs = {}
    for name, trainer_class in (("blocked", FwdGradTrainer), ("model's", OwnComputeLoss)):
        torch.manual_seed(0)
        model = tiny_gpt2(dropout=0.0)
        head_calls = []
        model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
        options = dict(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                       max_grad_norm=0.0, fwdgrad_inner_optim="forward_sgd")
        trainer = trainer_class(model=model, args=arguments(tmp_path / name, **options), train_dataset=language_data())
        trainer.train()
        runs[name] = (snapshot(model), len(head_calls))
    assert runs["blocked"][1] == 0 and runs["model's"][1] == 4
    for key, value in runs["model's"][0].items():
        torch.testing.assert_close(runs["blocked"][0][key], value, rtol=1e-4, atol=1e-6, msg=key)
