"""FwdGradTrainer: Trainer's own training_step runs, with the user's compute_loss as the
forward-gradient closure, and a max_grad_norm that clips the estimate says so once."""

import warnings

import pytest
from fwdgrad_plugins import FwdGradTrainer, LossWithoutTangentError

from tiny_transformers import arguments, classification_data, tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def train(tmp_path, trainer_class=FwdGradTrainer, **overrides):
    trainer = trainer_class(model=tiny_bert(dropout=0.0), args=arguments(tmp_path, **overrides),
                            train_dataset=classification_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if "max_grad_norm" in str(w.message)]


def test_clipping_every_estimate_warns_once_with_the_fix(tmp_path):
    messages = train(tmp_path, max_steps=3, max_grad_norm=1.0)
    assert len(messages) == 1
    assert "clipped the forward-gradient estimate" in messages[0] and "--max_grad_norm 0" in messages[0]


def test_no_warning_without_clipping(tmp_path):
    assert train(tmp_path, max_steps=2, max_grad_norm=0.0) == []
    assert train(tmp_path, max_steps=2, max_grad_norm=1e9) == []


def test_a_subclass_compute_loss_is_the_closure(tmp_path):
    """Trainer's training_step calls self.compute_loss; a subclass's runs in forward mode,
    so a loss it cuts from the model raises instead of training by backprop."""

    class Detaching(FwdGradTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch).detach()

    with pytest.raises(LossWithoutTangentError, match="carries no tangent"):
        train(tmp_path, trainer_class=Detaching, max_steps=1)

