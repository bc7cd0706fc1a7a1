"""FwdGradTrainer and FwdGradTrainingArguments: Trainer features with forward gradients,
on the tiny BERT and GPT-2 of ``tests/tiny_transformers.py`` (SDPA attention, CPU only)."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments, get
from fwdgrad_plugins.integrations.transformers_trainer import ESTIMATOR_STATE_NAME
from fwdgrad_plugins.tangents.counter_rng import derive_seed

from processes import free_port
from tiny_transformers import (LENGTH, MODELS, OwnComputeLoss, arguments, classification_data, language_data, snapshot,
                              tiny_bert, tiny_gpt2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_step_changes_every_trainable_parameter_and_no_frozen_one(name, tmp_path):
    make_model, make_data, frozen_name = MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    model.get_parameter(frozen_name).requires_grad_(False)
    before = snapshot(model)
    data = make_data()
    trainer = FwdGradTrainer(model=model, args=arguments(tmp_path, fwdgrad_num_directions=2),
                             train_dataset=data, eval_dataset=data[:8])
    result = trainer.train()
    after = snapshot(model)

    assert torch.equal(before[frozen_name], after[frozen_name])
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(before[n], after[n])]
    assert unchanged == []
    assert torch.isfinite(torch.tensor(result.training_loss))
    logged = trainer.state.log_history[0]
    assert logged["fwdgrad_mean_abs_dd"] > 0 and logged["fwdgrad_skipped"] == 0
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


@pytest.mark.parametrize("inner", ["forward_sgd", "sgd"])
@pytest.mark.parametrize("trainer_class", [FwdGradTrainer, OwnComputeLoss])
def test_a_causal_lm_s_loss_runs_blocked_and_without_a_kv_cache(trainer_class, inner, tmp_path, monkeypatch):
    """Without the user asking, the model builds no KV cache, and a large vocabulary's loss
    runs in blocks: Trainer's own compute_loss takes blocked_causal_lm_loss (the head module
    never runs), a subclass's compute_loss (the model's loss_function) the blocked
    cross-entropy rule."""
    from fwdgrad_plugins.engine import cross_entropy

    calls, caches, heads = [], [], []
    rule = cross_entropy.blocked_cross_entropy
    monkeypatch.setattr(cross_entropy, "blocked_cross_entropy", lambda *a, **k: calls.append(1) or rule(*a, **k))
    vocab = cross_entropy.MIN_CLASSES
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=vocab, n_embd=8, n_layer=1, n_head=2,
                                                        n_positions=LENGTH), attn_implementation="sdpa")
    model.transformer.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    data = [{"input_ids": x, "labels": x} for x in torch.randint(vocab, (8, LENGTH))]
    trainer_class(model=model, args=arguments(tmp_path, fwdgrad_inner_optim=inner, max_grad_norm=0.0),
                  train_dataset=data).train()
    assert caches and all(cache is None for cache in caches)
    if trainer_class is FwdGradTrainer:
        assert not heads and not calls
    else:
        assert heads and calls


@pytest.mark.slow
@pytest.mark.parametrize("num_directions", [1, 2])  # the dual-tensor pass and the vmapped jvp
def test_bf16_autocast_on_cpu_trains(num_directions, tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    before = snapshot(model)
    args = arguments(tmp_path, bf16=True, fwdgrad_num_directions=num_directions)
    trainer = FwdGradTrainer(model=model, args=args, train_dataset=classification_data())
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


class RecordGradients(TrainerCallback):
    """Each micro-batch's contribution to .grad, as the optimizer is about to see it."""

    def __init__(self, model):
        self.named = list(model.named_parameters())
        self.contributions, self.total, self.applied = [], None, None

    def _grads(self):
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in self.named}

    def on_substep_end(self, args, state, control, **kwargs):
        grads = self._grads()
        self.contributions.append({n: g - (0 if self.total is None else self.total[n]) for n, g in grads.items()})
        self.total = grads

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.applied = self._grads()  # after Trainer's clipping
        if args.max_grad_norm == 0:
            self.on_substep_end(args, state, control)


def train_one_step(trainer_class, make_model, make_data, tmp_path, loss_is_scaled_for_ga, **options):
    torch.manual_seed(0)
    model = make_model(dropout=0.0)
    args = arguments(tmp_path / trainer_class.__name__, gradient_accumulation_steps=2, **options)
    recorder = RecordGradients(model)
    trainer = trainer_class(model=model, args=args, train_dataset=make_data(), callbacks=[recorder])
    trainer.loss_is_scaled_for_ga = loss_is_scaled_for_ga  # Trainer's documented override
    trainer.train()
    return trainer, recorder


@pytest.mark.slow
@pytest.mark.parametrize("name, loss_is_scaled_for_ga, max_grad_norm", [
    ("bert", None, 0.0),
    ("bert", False, 1e-3),  # Trainer divides the loss by the accumulation steps; clipping on
    ("gpt2", None, 0.0),  # the model normalises by num_items_in_batch
])
def test_accumulated_estimate_is_trainers_gradient_projected_on_each_micro_batch_tangents(
        name, loss_is_scaled_for_ga, max_grad_norm, tmp_path):
    """With 2 micro-batches, .grad = Σ_m (1/K) Σ_k (g_m·v_mk) v_mk, where g_m is what plain
    Trainer's backward adds for micro-batch m and v_mk the tangents of estimator step m;
    max_grad_norm then clips it as it clips backprop gradients."""
    make_model, make_data, _ = MODELS[name]
    _, backprop = train_one_step(Trainer, make_model, make_data, tmp_path, loss_is_scaled_for_ga,
                                 optim="sgd", max_grad_norm=0.0)
    trainer, forward = train_one_step(FwdGradTrainer, make_model, make_data, tmp_path, loss_is_scaled_for_ga,
                                      max_grad_norm=max_grad_norm, fwdgrad_num_directions=3,
                                      fwdgrad_tangents="rademacher", fwdgrad_seed=5)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    sampler = get("tangent_samplers", "rademacher")()
    expected = {names[id(p)]: torch.zeros_like(p) for p in params}
    assert len(backprop.contributions) == 2 and trainer.forward_gradient.step == 2
    for step, gradient in enumerate(backprop.contributions):
        tangents = sampler.sample(params, 3, derive_seed(5, step))
        derivatives = sum((gradient[names[id(p)]] * t).flatten(1).sum(1) for p, t in zip(params, tangents))
        for p, t in zip(params, tangents):
            expected[names[id(p)]] += torch.einsum("k,k...->...", derivatives, t) / 3
    for module_name, module in trainer.model.named_modules():  # autograd never updates padding rows
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            expected[f"{module_name}.weight"][module.padding_idx] = 0
    if max_grad_norm:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in expected.values()]))
        expected = {n: e * min(1.0, max_grad_norm / (norm.item() + 1e-6)) for n, e in expected.items()}
    for n, want in expected.items():
        torch.testing.assert_close(forward.applied[n], want, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["weight", "guided"])  # guided: tensors of its own
def test_resume_from_checkpoint_ends_bit_identical(estimator, tmp_path):
    """Accumulation, warm-up + linear decay, clipping and dropout: 4 steps in one go equal 2
    steps, a checkpoint, and 2 resumed steps in a new trainer."""

    def run(output_dir, resume=None):
        torch.manual_seed(0)
        model = tiny_bert()
        args = arguments(output_dir, max_steps=4, save_steps=2, save_strategy="steps", gradient_accumulation_steps=2,
                         per_device_train_batch_size=2, lr_scheduler_type="linear", warmup_steps=1,
                         max_grad_norm=0.5, fwdgrad_inner_optim="adamw_torch", fwdgrad_num_directions=2,
                         fwdgrad_estimator=estimator)
        trainer = FwdGradTrainer(model=model, args=args, train_dataset=classification_data())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, snapshot(model)

    straight, straight_params = run(tmp_path / "straight")
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / ESTIMATOR_STATE_NAME).is_file()
    resumed, resumed_params = run(tmp_path / "resumed", resume=str(checkpoint))

    assert resumed.forward_gradient.step == straight.forward_gradient.step == 8
    for name, value in straight_params.items():
        assert torch.equal(value, resumed_params[name]), name
    rates = [log["learning_rate"] for log in straight.state.log_history if "learning_rate" in log]
    assert rates[0] < rates[1] > rates[-1] > 0  # warm-up, then linear decay

    os.remove(checkpoint / ESTIMATOR_STATE_NAME)
    with pytest.raises(FileNotFoundError, match="forward_gradient.json"):
        run(tmp_path / "again", resume=str(checkpoint))


def test_command_line_options_parse_with_hf_argument_parser(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--optim", "fwdgrad", "--fwdgrad_num_directions", "4",
            "--fwdgrad_tangents", "rank1-gaussian", "--fwdgrad_seed", "7", "--fwdgrad_inner_optim", "adamw_torch",
            "--learning_rate", "3e-4", "--use_cpu", "--report_to", "none"]
    (args,) = HfArgumentParser(FwdGradTrainingArguments).parse_args_into_dataclasses(argv)
    assert (args.optim, args.fwdgrad_num_directions, args.fwdgrad_tangents, args.fwdgrad_seed) == (
        "fwdgrad", 4, "rank1-gaussian", 7)
    trainer = FwdGradTrainer(model=tiny_bert(), args=args)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 3e-4
    assert trainer.forward_gradient.state_dict()["tangents"] == "rank1-gaussian"


def test_plain_argument_parser_rejects_fwdgrad(tmp_path, capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "fwdgrad"])
    assert "invalid choice: 'fwdgrad'" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("fwdgrad_tangents", "gausian", "--fwdgrad_tangents: unknown tangent sampler 'gausian'; registered: .*gaussian"),
    ("fwdgrad_estimator", "nope", "--fwdgrad_estimator: unknown estimator 'nope'"),
    ("fwdgrad_num_directions", "0", "--fwdgrad_num_directions must be an integer >= 1, got 0"),
])
def test_bad_option_fails_while_parsing_before_training(option, value, message, tmp_path):
    argv = ["--output_dir", str(tmp_path), "--optim", "fwdgrad", f"--{option}", value, "--use_cpu"]
    with pytest.raises(ValueError, match=message):
        HfArgumentParser(FwdGradTrainingArguments).parse_args_into_dataclasses(argv)


def test_an_estimator_forward_sgd_cannot_apply_fails_while_parsing_and_names_the_flag(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--optim", "fwdgrad", "--fwdgrad_estimator", "blockwise-parameter",
            "--fwdgrad_inner_optim", "forward_sgd", "--use_cpu"]
    with pytest.raises(ValueError, match="blockwise-parameter forms its estimate .* pass --fwdgrad_inner_optim sgd"):
        HfArgumentParser(FwdGradTrainingArguments).parse_args_into_dataclasses(argv)
    arguments(tmp_path, fwdgrad_estimator="spsa", fwdgrad_inner_optim="forward_sgd")  # one it can apply


def test_local_activity_is_refused_before_training_for_a_model_without_local_losses(tmp_path):
    from fwdgrad_plugins.estimators.local_losses import with_local_losses

    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(ValueError, match="local-activity trains a LocalLossNetwork .* BertForSequenceClassification"):
        FwdGradTrainer(model=model, args=arguments(tmp_path, fwdgrad_estimator="local-activity"),
                       train_dataset=classification_data())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    local = with_local_losses(mlp, num_classes=2, example_input=torch.zeros(1, 4))
    FwdGradTrainer(model=local, args=arguments(tmp_path, fwdgrad_estimator="local-activity"))  # accepted


def test_inner_optimizer_that_steps_inside_backward_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'lomo' updates parameters during backward"):
        arguments(tmp_path, fwdgrad_inner_optim="lomo")


def test_fwdgrad_options_without_optim_fwdgrad_warn_that_backprop_trains_at_the_callers_line(tmp_path):
    with pytest.warns(UserWarning, match="--fwdgrad_num_directions set but --optim is 'sgd'") as caught:
        arguments(tmp_path, optim="sgd", fwdgrad_num_directions=4)
    assert caught[0].filename.endswith("tiny_transformers.py"), caught[0].filename  # where arguments() builds them
    argv = ["--output_dir", str(tmp_path), "--optim", "sgd", "--fwdgrad_tangents", "rademacher", "--use_cpu"]
    with pytest.warns(UserWarning, match="--fwdgrad_tangents set") as caught:
        HfArgumentParser(FwdGradTrainingArguments).parse_args_into_dataclasses(argv)
    assert (caught[0].filename, caught[0].lineno) == (__file__, sys._getframe().f_lineno - 1)


@pytest.mark.slow
def test_a_given_optimizer_becomes_the_inner_one_and_a_wrapper_is_refused(tmp_path):
    from fwdgrad_plugins import ForwardGradient

    model = tiny_bert()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = FwdGradTrainer(model=model, args=arguments(tmp_path), train_dataset=classification_data(),
                             optimizers=(sgd, None))
    trainer.train()
    assert trainer.forward_gradient.step == 1 and trainer.optimizer.optimizer is sgd
    with pytest.raises(ValueError, match="not a ForwardGradient wrapper"):
        FwdGradTrainer(model=model, args=arguments(tmp_path), optimizers=(ForwardGradient(sgd), None))


@pytest.mark.slow
def test_plain_trainer_refuses_fwdgrad_arguments_before_any_update(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=classification_data())
    with pytest.raises(ValueError, match="optim='fwdgrad' needs FwdGradTrainer"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_other_optimizers_train_exactly_as_trainer(tmp_path):
    def run(trainer_class):
        torch.manual_seed(0)
        model = tiny_gpt2()
        args = arguments(tmp_path / trainer_class.__name__, optim="adamw_torch", max_steps=2)
        trainer_class(model=model, args=args, train_dataset=language_data()).train()
        return snapshot(model)

    reference, ours = run(Trainer), run(FwdGradTrainer)
    assert all(torch.equal(reference[n], ours[n]) for n in reference)


@pytest.mark.slow
def test_recipe_trains_both_ways_and_prints_the_comparison(mnist_root, tmp_path, monkeypatch, capsys):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "hf_trainer.py"
    results = tmp_path / "results.jsonl"
    for optim in (["adamw_torch"], ["fwdgrad", "--fwdgrad_inner_optim", "adamw_torch"]):
        monkeypatch.setattr(sys, "argv", [
            str(recipe), "--optim", *optim, "--max_steps", "3", "--train_samples", "64", "--eval_samples", "64",
            "--data_dir", str(mnist_root), "--results_file", str(results), "--output_dir", str(tmp_path / optim[0])])
        runpy.run_path(str(recipe), run_name="__main__")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["steps"] for row in rows] == [3, 3]
    assert all(0 <= row["eval_accuracy"] <= 1 and row["eval_loss"] > 0 for row in rows)
    assert "fwdgrad K=1 gaussian adamw_torch lr=0.01 vs backprop adamw_torch lr=0.01" in capsys.readouterr().out


def train_language_model(output_dir, batch_size):
    torch.manual_seed(0)
    model = tiny_gpt2(dropout=0.0)
    args = arguments(output_dir, per_device_train_batch_size=batch_size, max_steps=2, max_grad_norm=0.0,
                     fwdgrad_num_directions=2)
    FwdGradTrainer(model=model, args=args, train_dataset=language_data()).train()
    return args, snapshot(model)


@pytest.mark.slow
def test_two_processes_apply_the_update_of_one_process_on_the_global_batch(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, DDP-wrapped model), batch 2 each: the
    mean directional derivative over processes and shared tangents give every process the
    update that one process computes on the batch of 4, with no gradient all-reduce."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
               __file__, str(tmp_path / "two")]
    tests = str(Path(__file__).resolve().parents[1])  # the helper modules it imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    _, single = train_language_model(tmp_path / "one", batch_size=4)
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-7, msg=name)


if __name__ == "__main__":  # one process of test_two_processes_...
    args, params = train_language_model(Path(sys.argv[1]), batch_size=2)
    assert args.world_size == 2, args.world_size
    torch.save(params, Path(sys.argv[1]) / f"rank{args.process_index}.pt")
    torch.distributed.destroy_process_group()  # leave no gloo thread running at exit


def test_a_sharded_or_deepspeed_setup_is_refused_naming_the_sharded_route(tmp_path):
    trainer = FwdGradTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=classification_data())
    trainer.is_fsdp_enabled = True  # as Accelerate's FSDP plugin sets it on GPUs
    with pytest.raises(ValueError, match=r"does not support FSDP.*fully_shard.*docs/distributed.md"):
        trainer._check_supported_setup()
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = False, True
    with pytest.raises(ValueError, match=r"does not support DeepSpeed.*--multi_gpu") as refused:
        trainer._check_supported_setup()
    assert "fully_shard" not in str(refused.value)


def test_estimator_options_reach_the_estimator_and_bad_ones_fail_while_parsing(tmp_path):
    parser = HfArgumentParser(FwdGradTrainingArguments)
    flags = ["--output_dir", str(tmp_path), "--optim", "fwdgrad", "--use_cpu", "--max_steps", "1",
             "--report_to", "none", "--fwdgrad_estimator", "weight-per-example-span-blockwise"]
    (args,) = parser.parse_args_into_dataclasses(flags + ["--fwdgrad_estimator_options", '{"blocks": "parameter"}'])
    trainer = FwdGradTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=classification_data())
    assert trainer.forward_gradient.estimator.blocks == "parameter"
    trainer.train()
    for bad, message in (('{"block": "parameter"}', "do not fit.*unexpected keyword argument 'block'"),
                         ("blocks=parameter", "must be a JSON object")):
        with pytest.raises(ValueError, match=message):
            parser.parse_args_into_dataclasses(flags + ["--fwdgrad_estimator_options", bad])
